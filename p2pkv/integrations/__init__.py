"""Adapters that plug p2pkv's engine-neutral connector into serving engines.
`p2pkv.integrations.vllm.P2pKvConnector` is vLLM v1's; only this package imports vLLM."""
