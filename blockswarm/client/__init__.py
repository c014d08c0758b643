"""The user API: DistributedModelForCausalLM, generate, inference sessions, gradients through the swarm."""

from blockswarm.client.model import DistributedModelForCausalLM
from blockswarm.client.session import GenerationSession

__all__ = ["DistributedModelForCausalLM", "GenerationSession"]
