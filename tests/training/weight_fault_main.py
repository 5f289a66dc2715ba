"""pretrain_esft.py with one weight changed behind the optimizer's back: the fault that training/weight_checks.py
must catch. Usage (python or torchrun):

    weight_fault_main.py {frozen|trained} ITERATION RANK pretrain_esft.py's arguments...

After the optimizer step of ITERATION, on RANK only, the first element of the first routed-experts weight that is
frozen (or trained) moves up by one ulp, as a stray in-place write would move it; the name is printed as
`FAULT <name>`. The hook is the trainer's own call after every step (`experts.note_expert_weights_updated`), so the
rest of the run is the real trainer.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import megatron_esft.experts as experts  # noqa: E402
from megatron_esft.errors import run_cli  # noqa: E402


def main() -> None:
    kind, at, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    real_note, steps = experts.note_expert_weights_updated, []

    def note_and_nudge(model_chunks):
        steps.append(None)
        if len(steps) == at and torch.distributed.get_rank() == rank:
            chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
            name, param = next((n, p) for chunk in chunks for n, p in chunk.named_parameters()
                               if ".experts." in n and p.requires_grad == (kind == "trained"))
            with torch.no_grad():
                flat = param.view(-1)
                flat[0] = torch.nextafter(flat[0], flat[0] + 1)
            print(f"FAULT {name}", flush=True)
        return real_note(model_chunks)

    experts.note_expert_weights_updated = note_and_nudge
    sys.argv = [os.path.join(REPO, "pretrain_esft.py"), *sys.argv[4:]]
    from megatron_esft.training.loop import pretrain

    run_cli(pretrain)


if __name__ == "__main__":  # --async-save's writer process (spawn) imports this file again
    main()
