"""The native data path's parser and geometry (csrc/net) against the Python layout they must agree
with: the same rows for every preset pair, and any byte string a peer might send either refused
or turned into rows inside the registered memory. .ci/fuzz-native fuzzes the same code under
ASan/UBSan."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pkv.layout import PRESETS, BlockRows, make_kv_caches
from p2pkv.transport import native as nat

native = nat.require("tcp")
BASES = [(r + 1) << 40 for r in range(64)]  # addresses are computed, never touched


def _spec(layout: str, blocks: int = 10):
    return make_kv_caches(layout, num_layers=2, num_blocks=blocks, block_size=16, num_kv_heads=2, head_size=64,
                          dtype="bf16")[1]


def _rows(iov: bytes) -> list[tuple[int, int]]:
    a = np.frombuffer(iov, dtype="<u8").reshape(-1, 2)
    return [(int(x), int(n)) for x, n in a]


def _bytes(rows) -> list[int]:
    return [a + k for a, n in rows for k in range(n)]


@settings(max_examples=60, deadline=None)
@given(pair=st.sampled_from([(lay, lay) for lay in PRESETS] + [("vllm", "block_first"), ("block_first", "vllm")]),
       data=st.data())
def test_native_rows_are_the_layouts_rows_byte_for_byte(pair, data):
    src_spec, dst_spec = _spec(pair[0]), _spec(pair[1])
    rows = BlockRows(src_spec, dst_spec)
    n = data.draw(st.integers(0, 10))
    ids = np.asarray(data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)), dtype=np.int64)
    nreg = len(src_spec.regions)
    regions = data.draw(st.none() | st.lists(st.integers(0, nreg - 1), min_size=1, max_size=nreg, unique=True))
    for side, spec in (("src", src_spec), ("dst", dst_spec)):
        bases = np.asarray(BASES[:nreg], dtype=np.uintp)
        geo = nat.geometry(rows, side, bases, [r.nbytes for r in spec.regions])
        body = nat.request_body(nat.FORM_BLOCKS, "r", ids.astype("<i8").tobytes(), len(ids), regions)
        got = _rows(geo.iovecs(body, False, side == "dst", False))
        want = rows.iovecs(ids, side, None if regions is None else tuple(regions), bases).tolist()
        assert _bytes(got) == _bytes(want)  # the same bytes in the same order
        assert len(got) <= len(want)  # merged at least as far as the layout merges


def test_native_refusals_name_the_field():
    spec = _spec("vllm")
    geo = nat.geometry(BlockRows(spec, spec), "dst", BASES[:2], [r.nbytes for r in spec.regions])
    cases = [(np.array([3, 10]), None, True, "destination block id 10 out of range \\[0, 10\\)"),
             (np.array([2, 2]), None, True, "duplicate destination block id 2"),
             (np.array([1]), [0, 5], False, "regions name 5, outside the 2 registered")]
    for ids, regions, distinct, why in cases:
        body = nat.request_body(nat.FORM_BLOCKS, "r", ids.astype("<i8").tobytes(), len(ids), regions)
        with pytest.raises(ValueError, match=why):
            geo.iovecs(body, True, True, distinct)
    table = np.array([[0, spec.regions[0].nbytes - 8, 16]], dtype="<i8").tobytes()
    with pytest.raises(ValueError, match="runs past the end of region 0"):
        geo.iovecs(nat.request_body(nat.FORM_TABLE, "t", table, 1), True, True, False)
    body = nat.request_body(nat.FORM_BLOCKS, "r", b"\0" * 8, 1)
    for bad, why in [(body[:-1], "fields add up to"), (body + b"x", "fields add up to"),
                     (b"\x07" + body[1:], "unknown request form 7"), (body[:10], "shorter than its 24-byte head")]:
        with pytest.raises(ValueError, match=why):
            native.parse_request(bad, True)
    with pytest.raises(ValueError, match="a read carries no notify message"):
        native.parse_request(nat.request_body(nat.FORM_BLOCKS, "r", b"", 0, notify=b"\x80"), False)


def test_a_geometry_whose_blocks_overrun_their_region_is_refused():
    spec = _spec("vllm")
    with pytest.raises(ValueError, match="ends past the region"):
        nat.geometry(BlockRows(spec, spec), "src", BASES[:2], [r.nbytes - 1 for r in spec.regions])


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400), is_write=st.booleans())
def test_any_bytes_are_refused_or_parsed_into_rows_inside_the_regions(body, is_write):
    spec = _spec("mla")
    sizes = [r.nbytes for r in spec.regions]
    geo = nat.geometry(BlockRows(spec, spec), "src", BASES[:len(sizes)], sizes)
    try:
        fields = native.parse_request(body, is_write)
    except ValueError:
        return
    assert len(fields["request_id"]) <= 1024
    try:
        rows = _rows(geo.iovecs(body, is_write, False, is_write))
    except ValueError:
        return
    for a, n in rows:
        assert any(b <= a and a + n <= b + s for b, s in zip(BASES, sizes))


def test_without_the_native_build_tcp_says_how_to_build_it(monkeypatch):
    from p2pkv.transport import BackendUnavailable, get_transport
    monkeypatch.setattr(nat, "native", None)
    monkeypatch.setattr(nat, "_why", "No module named 'p2pkv._native'")
    with pytest.raises(BackendUnavailable, match=r"tcp backend needs p2pkv's native data path .*pip install -e \."):
        get_transport("tcp")
