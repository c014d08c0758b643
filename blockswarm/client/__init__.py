"""The user API: DistributedModelForCausalLM, generate, inference sessions, gradients through the swarm, and
SwarmTrainer for SWARM training with many micro-batches in flight."""

from blockswarm.client.model import DistributedModelForCausalLM
from blockswarm.client.session import GenerationSession
from blockswarm.client.swarm_trainer import SwarmTrainer, TrainingReport, causal_lm_loss

__all__ = ["DistributedModelForCausalLM", "GenerationSession", "SwarmTrainer", "TrainingReport", "causal_lm_loss"]
