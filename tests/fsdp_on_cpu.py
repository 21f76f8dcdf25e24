"""`python -m accelerate.commands.launch --config_file FSDP.yaml tests/fsdp_on_cpu.py ARGS`: ecomla's CLI with
accelerate's FSDP path taken on CPU processes (gloo).

accelerate (1.16) chooses FSDP only on GPU-like devices and runs DDP on CPU processes; torch's FSDP2 itself shards
on CPU. This launcher sets accelerate's state to FSDP after accelerate sets it up, so its real FSDP code (fully_shard
by the config's wrap policy, mixed precision policy, full and sharded checkpoints, get_state_dict) runs on the CPUs
of a test machine, as it would on GPUs."""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_plugin = []


def _as_fsdp(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not _plugin:
            _plugin.append(FullyShardedDataParallelPlugin())  # read from the launcher's FSDP_* environment
        self.distributed_type = DistributedType.FSDP
        if isinstance(self, AcceleratorState):
            self.fsdp_plugin = _plugin[0]
    return patched


for _cls in (PartialState, AcceleratorState):
    _cls.__init__ = _as_fsdp(_cls.__init__)

if __name__ == "__main__":
    from ecomla.cli import main

    sys.exit(main(sys.argv[1:]))
