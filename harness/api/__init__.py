"""The interface between the harness and its adapters: the Adapter class, the run context
it is given, and the registry that finds adapters."""

from harness.api.adapter import (BOS, BYTE_VOCAB, Adapter, AdapterConfig, AuxiliaryTrainer, AuxiliaryTraining, Preparation,
                                 RunContext, SizingFields, TrainingLoss)
from harness.api.registry import available, build, get, register

__all__ = ["BOS", "BYTE_VOCAB", "Adapter", "AdapterConfig", "AuxiliaryTrainer", "AuxiliaryTraining", "Preparation", "RunContext", "SizingFields",
           "TrainingLoss", "available", "build", "get", "register"]
