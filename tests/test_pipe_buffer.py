"""Ordered tensor pipe and bounded lookup buffer over real loopback sockets."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from p2pkv.buffer import LookupBuffer
from p2pkv.pipe import TensorPipe


def make_pipe(**kw):
    rx = TensorPipe("tcp", **kw)
    tx = TensorPipe("tcp", **kw)
    tx.connect(rx.address)
    return tx, rx


@pytest.mark.timeout(60)
def test_pipe_keeps_order_with_none_entries_and_many_dtypes():
    tx, rx = make_pipe(slots=40, slot_bytes=4096)
    try:
        items = [torch.arange(10, dtype=torch.int64), None, torch.randn(3, 700), None, None,
                 torch.ones(0, 5), torch.tensor(3.5, dtype=torch.bfloat16), torch.randint(0, 2, (9,), dtype=torch.bool),
                 torch.randn(64, 1024).half()]
        got = []
        t = threading.Thread(target=lambda: got.extend(rx.recv_tensor() for _ in items))
        t.start()
        for x in items:
            tx.send_tensor(x)
        t.join(30)
        assert len(got) == len(items)
        for a, b in zip(items, got):
            if a is None:
                assert b is None
            else:
                assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
    finally:
        tx.close()
        rx.close()


@pytest.mark.timeout(60)
def test_pipe_backpressure_then_timeout_when_receiver_stops_reading():
    tx, rx = make_pipe(slots=2, slot_bytes=1024, timeout=1.0)
    try:
        tx.send_tensor(torch.zeros(256, dtype=torch.int32))
        tx.send_tensor(torch.zeros(256, dtype=torch.int32))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="backpressure"):
            tx.send_tensor(torch.zeros(256, dtype=torch.int32))
        assert 0.9 < time.monotonic() - t0 < 5
        assert torch.equal(rx.recv_tensor(), torch.zeros(256, dtype=torch.int32))
        with pytest.raises(ValueError, match="capacity"):
            tx.send_tensor(torch.zeros(1024, dtype=torch.int32))
    finally:
        tx.close()
        rx.close()


@pytest.mark.timeout(60)
def test_pipe_across_processes():
    rx = TensorPipe("tcp", slots=4, slot_bytes=1 << 16)
    code = textwrap.dedent(f"""
        import torch
        from p2pkv.pipe import TensorPipe
        tx = TensorPipe("tcp", slots=4, slot_bytes=1 << 16)
        tx.connect({rx.address!r})
        g = torch.Generator().manual_seed(3)
        for i in range(20):
            tx.send_tensor(None if i % 5 == 0 else torch.randn(i, 300, generator=g))
        tx.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        g = torch.Generator().manual_seed(3)
        for i in range(20):
            got = rx.recv_tensor(timeout=30)
            if i % 5 == 0:
                assert got is None
            else:
                assert torch.equal(got, torch.randn(i, 300, generator=g))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        rx.close()


def buffers(capacity, timeout=2.0):
    p_req, c_data = TensorPipe("tcp"), TensorPipe("tcp")
    p_data, c_req = TensorPipe("tcp"), TensorPipe("tcp")
    c_req.connect(p_req.address)
    p_data.connect(c_data.address)
    producer = LookupBuffer(p_data, p_req, capacity_bytes=capacity, timeout=timeout)
    consumer = LookupBuffer(c_req, c_data, timeout=timeout)
    return producer, consumer, [p_req, c_data, p_data, c_req]


@pytest.mark.timeout(60)
def test_lookup_buffer_insert_drop_select_and_backpressure():
    producer, consumer, pipes = buffers(capacity=3300)
    try:
        a = [torch.arange(250, dtype=torch.int32), torch.ones(10)]
        producer.insert("req-a", a)
        assert producer.used_bytes == 1040
        producer.insert("req-b", [torch.zeros(400, dtype=torch.int32)])
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="buffer full"):
            producer.insert("req-c", [torch.zeros(400, dtype=torch.int32)], timeout=0.5)
        assert time.monotonic() - t0 >= 0.45
        waiter = threading.Thread(target=producer.insert, args=("req-c", [torch.full((400,), 7, dtype=torch.int32)]))
        waiter.start()
        got = consumer.drop_select("req-a")
        assert got is not None and all(torch.equal(x, y) for x, y in zip(got, a))
        waiter.join(10)
        assert not waiter.is_alive()
        assert consumer.drop_select("req-a") is None
        c = consumer.drop_select("req-c")
        assert torch.equal(c[0], torch.full((400,), 7, dtype=torch.int32))
        assert producer.used_bytes == 1600  # req-b is still held
        with pytest.raises(ValueError, match="exceed"):
            producer.insert("huge", [torch.zeros(1000)])
    finally:
        producer.close()
        consumer.close()
        for p in pipes:
            p.close()
