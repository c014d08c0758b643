"""The user API: DistributedModelForCausalLM, generate, inference sessions, gradients through the swarm."""

from blockswarm.client.model import DistributedModelForCausalLM, GenerationSession

__all__ = ["DistributedModelForCausalLM", "GenerationSession"]
