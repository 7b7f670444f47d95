"""Router training: distillation from the dense model under a compute budget (E-DiT), per step or through
whole sampler rollouts with the feature cache in the loop."""
from .common import TrainLogEntry, TrainReport
from .pipeline_trajectories import record_pipeline_trajectories
from .distill import train_routers
from .rollout import ClassConditionalRollout, Rollout, calibrate_threshold, start_from_block_cache
from .schedule_routers import fit_schedule_routers
from .store import TrajectoryStore
from .trajectories import TrajectoryDataset, record_class_conditional_trajectories, record_trajectories

__all__ = ["ClassConditionalRollout", "Rollout", "TrainLogEntry", "TrainReport", "TrajectoryDataset",
           "TrajectoryStore", "calibrate_threshold", "fit_schedule_routers", "record_class_conditional_trajectories", "record_pipeline_trajectories",
           "record_trajectories",
           "start_from_block_cache", "train_routers"]
