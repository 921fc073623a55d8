"""Engine-neutral KV connector: a producer (P) saves a request's blocks, a consumer
(D) loads them into its own blocks, in pull ("P then D": D reads) or push ("D then
P": D tells P its blocks, P writes) mode, layer by layer, over any transport.

P never holds blocks forever: a hold ends when D confirms, or after `hold_timeout`.
A failed load names exactly the local blocks that did not arrive, so the engine
can recompute them. Control messages are small msgpack dicts sent as transport
notifs: D→P "release" (pull, loaded), "cancel" (gave up), "want" (push: D's blocks),
"held?" (pull: were the blocks still held, or did P free them before D read them),
"sum?" (pull checksum, which answers that too); P→D "landed" (push, per layer),
"abort", "held", "sum". A pull load is reported loaded only after P's answer.
"""
from p2pkv.connector.core import MODES, KVConnector
from p2pkv.connector.records import Finished, LoadFailure

__all__ = ["KVConnector", "Finished", "LoadFailure", "MODES"]
