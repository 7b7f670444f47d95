"""Router training: distillation from the dense model under a compute budget (E-DiT)."""
from .common import TrainLogEntry, TrainReport
from .distill import train_routers
from .trajectories import TrajectoryDataset, record_class_conditional_trajectories, record_trajectories

__all__ = ["TrainLogEntry", "TrainReport", "TrajectoryDataset", "record_class_conditional_trajectories",
           "record_trajectories", "train_routers"]
