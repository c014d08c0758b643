"""blockswarm: run and train large language models on a swarm of volunteer machines."""

__version__ = "0.1.0"

__all__ = ["DistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that peers and tools never pay for (or depend on) the client package.
    if name == "DistributedModelForCausalLM":
        from blockswarm.client import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    raise AttributeError(f"module 'blockswarm' has no attribute {name!r}")
