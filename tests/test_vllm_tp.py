"""The vLLM adapter's tensor-parallel pieces without an engine: P names every rank's address in its
params, D hands every rank's address to its loads and discards, malformed TP params cost a local
prefill, push and pipeline parallelism are refused with what to do instead, and a worker finds its
tensors' head dim and its own port."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_vllm_e2e import fake_blocks, fake_connector, fake_request  # noqa: E402

from p2pkv.integrations.params import TransferParams  # noqa: E402
from p2pkv.integrations.vllm import DiscardSpec, LoadSpec  # noqa: E402
from p2pkv.integrations.vllm.specs import P2pKvHandshake  # noqa: E402
from p2pkv.integrations.vllm.worker import dim_names, rank_address  # noqa: E402

RANKS = ("10.0.0.1:7100", "10.0.0.1:7101")
TP_PULL = {"do_remote_prefill": True, "transfer_mode": "pull", "remote_address": RANKS[0],
           "remote_addresses": list(RANKS), "remote_tp_size": 2, "remote_request_id": "p-7",
           "remote_block_ids": [21, 22, 23], "remote_num_tokens": 70}


def test_a_tp_producer_names_every_rank_in_rank_order():
    from vllm.v1.request import RequestStatus
    c = fake_connector("kv_producer", tp=2)
    c.set_xfer_handshake_metadata({1: P2pKvHandshake(RANKS[1]), 0: P2pKvHandshake(RANKS[0])})
    req = fake_request(70, {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED, computed=70)
    delay, params = c.request_finished(req, [11, 12, 13])
    assert delay and params["remote_address"] == RANKS[0]
    assert params["remote_addresses"] == list(RANKS) and params["remote_tp_size"] == 2
    assert TransferParams.from_dict(params).problem() is None


def test_a_tp_producer_without_every_ranks_address_holds_nothing():
    from vllm.v1.request import RequestStatus
    c = fake_connector("kv_producer", tp=2)
    c.set_xfer_handshake_metadata({0: P2pKvHandshake(RANKS[0])})
    req = fake_request(70, {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED, computed=70)
    assert c.request_finished(req, [11, 12, 13]) == (False, None)
    assert c.build_connector_meta(None).saves == []


def test_a_consumer_loads_and_discards_with_every_p_rank():
    c = fake_connector("kv_consumer", tp=2)
    req = fake_request(70, dict(TP_PULL))
    assert c.get_num_new_matched_tokens(req, 0) == (70, True)
    c.update_state_after_alloc(req, fake_blocks([5, 6, 7], cached=0), 70)
    load, = c.build_connector_meta(None).loads
    assert load == LoadSpec("req-1", "p-7", RANKS, blocks=(5, 6, 7), remote_blocks=(21, 22, 23), offset=0)
    req = fake_request(70, dict(TP_PULL))
    c.get_num_new_matched_tokens(req, 0)
    c.update_state_after_alloc(req, fake_blocks([5, 6, 7], cached=0), 0)
    assert c.build_connector_meta(None).discards == [DiscardSpec(RANKS, "p-7")]


@pytest.mark.parametrize("bad", [{"remote_tp_size": 3}, {"remote_addresses": ["10.0.0.1:7100", 7101]},
                                 {"remote_addresses": ["10.0.0.2:7100", "10.0.0.1:7101"]},
                                 {"remote_addresses": [], "remote_tp_size": 0}, {"remote_addresses": "10.0.0.1:7100"},
                                 {"remote_addresses": None, "remote_tp_size": 2}])
def test_malformed_tp_params_cost_a_local_prefill(bad):
    c = fake_connector("kv_consumer", tp=2)
    req = fake_request(70, {**TP_PULL, **bad})
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)
    assert TransferParams.from_dict({**TP_PULL, **bad}).problem()


def test_push_with_tp_and_pipeline_parallelism_are_refused_with_what_to_do():
    with pytest.raises(NotImplementedError, match="use mode 'pull'"):
        fake_connector("kv_consumer", mode="push", tp=2)
    with pytest.raises(NotImplementedError, match="pipeline parallelism"):
        fake_connector("kv_consumer", pp=2)


@pytest.mark.parametrize("shape,heads,names", [
    ((4096, 1, 32, 64), 1, ("block", "head", "token", "kvdim")),        # vLLM CPU: [N, H, B, 2*D]
    ((2, 4096, 32, 4, 32), 4, ("kv", "block", "token", "head", "dim")),  # vLLM GPU (HND by strides)
    ((4096, 2, 32, 4, 32), 4, ("block", "kv", "token", "head", "dim")),  # block-first (FlashInfer)
    ((4096, 32, 576), 0, ("block", "token", "dim")),                     # MLA
    ((4096, 7, 32, 64), 1, None)])
def test_a_worker_names_the_dims_of_vllms_kv_tensors(shape, heads, names):
    head_size = 576 if heads == 0 else 32
    assert dim_names(shape, 4096, 32, heads, head_size) == names


def test_each_rank_listens_and_advertises_on_its_own_port():
    assert rank_address("127.0.0.1:7100", 1) == "127.0.0.1:7101"
    assert rank_address("127.0.0.1:0", 3) == "127.0.0.1:0"
    assert rank_address("[::1]:7100", 2) == "[::1]:7102"
    assert rank_address("host:7100", 0) == "host:7100"
