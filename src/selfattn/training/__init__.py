"""Training a small transformer end to end: data, loop, checkpoints, sampling, torch.distributed.

    selfattn train                       # the recall task an induction head solves; stops at 99 % held-out accuracy
    selfattn train --text FILE           # a character-level model of any text file
    selfattn sample --checkpoint DIR     # generate with the KV cache
    torchrun --standalone --nproc_per_node 2 -m selfattn.cli train   # data-parallel (gloo on CPU, nccl on GPU)
    selfattn train --long --init DIR --context-parallel 2   # 4096-token sequences, each split over 2 processes
    selfattn train --qk-clip 8           # QK-clip: each head's max logit brought back to 8 after every step
"""

from .data import IGNORE, RecallTask, TextDataset
from .loop import Result, TrainConfig, make_config, resume_config, train
from .sample import generate, sample_text

__all__ = ["IGNORE", "RecallTask", "TextDataset", "TrainConfig", "Result", "make_config", "resume_config", "train",
           "generate", "sample_text"]
