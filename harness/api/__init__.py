"""The interface between the harness and its adapters: the Adapter class, the run context
it is given, the registry that finds adapters, and where an adapter may keep files (the cache)."""

from harness.api.adapter import (BOS, BYTE_VOCAB, MAX_VOCAB, MAX_WIDTH, Adapter, AdapterConfig, AuxiliaryTrainer,
                                 AuxiliaryTraining, CalibrationCost, Preparation, RunContext, SizingFields, TrainingLoss)
from harness.api.registry import available, build, get, register
from harness.storage import cache_dir, read_cache_entry, write_json_atomic

__all__ = ["BOS", "BYTE_VOCAB", "MAX_VOCAB", "MAX_WIDTH", "Adapter", "AdapterConfig", "AuxiliaryTrainer", "AuxiliaryTraining",
           "CalibrationCost", "Preparation", "RunContext", "SizingFields", "TrainingLoss", "available", "build", "cache_dir",
           "get", "read_cache_entry", "register", "write_json_atomic"]
