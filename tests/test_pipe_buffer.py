"""Ordered tensor pipe and bounded lookup buffer over real loopback sockets."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from p2pkv.buffer import LookupBuffer
from p2pkv.pipe import TensorPipe
from procs import run_pinned


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


@contextlib.contextmanager
def buffers(capacity, timeout=2.0):
    """A producer and a consumer LookupBuffer over two pipe pairs on loopback; all closed on exit."""
    p_req, c_data = TensorPipe("tcp"), TensorPipe("tcp")
    p_data, c_req = TensorPipe("tcp"), TensorPipe("tcp")
    pipes = [p_req, c_data, p_data, c_req]
    producer = consumer = None
    try:
        c_req.connect(p_req.address)
        p_data.connect(c_data.address)
        producer = LookupBuffer(p_data, p_req, capacity_bytes=capacity, timeout=timeout)
        consumer = LookupBuffer(c_req, c_data, timeout=timeout)
        yield producer, consumer, pipes
    finally:
        for b in (producer, consumer):
            if b is not None:
                b.close()
        for pipe in pipes:
            pipe.close()


@pytest.mark.timeout(60)
def test_lookup_buffer_insert_drop_select_and_backpressure():
    with buffers(capacity=3300) as (producer, consumer, pipes):
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


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pipe_refuses_what_it_cannot_send_and_stays_in_order():
    tx, rx = make_pipe(slots=4, slot_bytes=256, timeout=2.0)
    try:
        q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)
        for bad, msg in [([1, 2], "torch.Tensor"), (q, "quantized"), (torch.eye(2).to_sparse(), "sparse"),
                         (torch.empty(3, device="meta"), "meta")]:
            with pytest.raises(TypeError, match=msg):
                tx.send_tensor(bad)
        z = torch.tensor([1 + 2j, 3 - 1j]).conj()
        tx.send_tensor(z)
        tx.send_tensor(torch.arange(6).reshape(2, 3).t())
        assert torch.equal(rx.recv_tensor(timeout=5), z.resolve_conj())
        assert torch.equal(rx.recv_tensor(timeout=5), torch.arange(6).reshape(2, 3).t())
    finally:
        tx.close()
        rx.close()


@pytest.mark.timeout(30)
def test_pipe_used_after_close_says_so_at_once():
    tx, rx = make_pipe(timeout=10.0)
    tx.close()
    rx.close()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="pipe is closed"):
        rx.recv_tensor()
    with pytest.raises(RuntimeError, match="pipe is closed"):
        tx.send_tensor(torch.ones(1))
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(30)
def test_lookup_that_timed_out_never_gets_another_keys_answer():
    """The producer serves from its first insert on; a lookup made before then times out,
    and its late answer must not be taken for the answer to a later lookup."""
    with buffers(capacity=1 << 20, timeout=1.0) as (producer, consumer, pipes):
        with pytest.raises(TimeoutError, match="lookup of 'a'"):
            consumer.drop_select("a")
        a, b = [torch.arange(5)], [torch.ones(3)]
        producer.insert("a", a)
        producer.insert("b", b)
        got_b = consumer.drop_select("b")
        assert got_b is not None and torch.equal(got_b[0], b[0])
        got_a = consumer.drop_select("a")
        assert got_a is not None and torch.equal(got_a[0], a[0])
        assert consumer.drop_select("a") is None


@pytest.mark.timeout(30)
def test_same_key_inserted_twice_while_waiting_for_space_is_refused():
    with buffers(capacity=100, timeout=5.0) as (producer, consumer, pipes):
        producer.insert("x", [torch.zeros(100, dtype=torch.uint8)])
        errors = []

        def put(v):
            try:
                producer.insert("k", [torch.full((40,), v, dtype=torch.uint8)])
            except ValueError as e:
                errors.append(e)
        threads = [threading.Thread(target=put, args=(v,)) for v in (1, 2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert consumer.drop_select("x") is not None
        for t in threads:
            t.join(10)
        assert len(errors) == 1 and "already in the buffer" in str(errors[0])
        assert producer.used_bytes == 40


@pytest.mark.timeout(30)
def test_lookup_buffer_misuse_is_refused():
    with buffers(capacity=100, timeout=5.0) as (producer, consumer, pipes):
        with pytest.raises(ValueError, match="timeout"):
            LookupBuffer(pipes[0], pipes[1], timeout=0)
        with pytest.raises(TypeError, match="sequence of tensors"):
            producer.insert("s", torch.zeros(3))
        with pytest.raises(TypeError, match="list"):
            producer.insert("n", [[1, 2]])
        with pytest.raises(TypeError, match="key"):
            producer.insert(5, [torch.zeros(1)])
        assert producer.used_bytes == 0
        producer.insert("full", [torch.zeros(100, dtype=torch.uint8)])
        errors = []

        def put():
            try:
                producer.insert("late", [torch.zeros(10, dtype=torch.uint8)])
            except RuntimeError as e:
                errors.append(e)
        waiter = threading.Thread(target=put)
        waiter.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        producer.close()
        waiter.join(10)
        assert time.monotonic() - t0 < 3 and len(errors) == 1 and "closed" in str(errors[0])
        with pytest.raises(RuntimeError, match="lookup buffer is closed"):
            producer.insert("z", [torch.zeros(1)])
        consumer.close()
        with pytest.raises(RuntimeError, match="lookup buffer is closed"):
            consumer.drop_select("z")


_LOOKUP_AFFINITY = """
import torch
from test_pipe_buffer import buffers
with buffers(capacity=1 << 20, timeout=10.0) as (producer, consumer, _):
    producer.insert("k", [torch.ones(4)])
    assert consumer.drop_select("k") is not None  # answered by the producer's serving thread
    print(sorted(os.sched_getaffinity(producer._server.native_id)))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_lookup_buffers_thread_leaves_the_core_the_engine_pinned():
    """insert() runs on the engine's thread, pinned to one core; the serving thread it starts takes
    every CPU (P2PKV_IO_CPUS unset) instead of waiting behind the engine for that core."""
    assert run_pinned(_LOOKUP_AFFINITY, timeout=100) == sorted(os.sched_getaffinity(0))
