"""Datasets as conversations: one module per source, mixtures for the chat stages, offline builders.

See base.py for the Task protocol; `nanochat data evals` (offline_data.py) builds every task without the hub.
"""

from nanochat.tasks.arc import ARC
from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.base import ListTask, Task, TaskMixture, TaskSequence, eval_data_dir
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = ["ARC", "Arithmetic", "GSM8K", "HumanEval", "Identity", "ListTask", "MMLU", "SimpleSpelling", "SmolTalk",
           "SpellingBee", "Task", "TaskMixture", "TaskSequence", "eval_data_dir"]
