"""p2pkv: point-to-point transfer of an LLM's paged KV cache from prefill to decode ranks."""
from p2pkv.layout import PRESETS, KVCacheSpec, make_kv_caches, plan_segments
from p2pkv.segments import Segments
from p2pkv.tp import ShardRead, tp_plan
from p2pkv.transport import TransferError, TransferHandle, get_transport

__version__ = "0.1.0"
__all__ = ["KVCacheSpec", "Segments", "PRESETS", "make_kv_caches", "plan_segments", "get_transport", "TransferError",
           "TransferHandle", "ShardRead", "tp_plan", "__version__"]
