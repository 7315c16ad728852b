"""One rank of the distributed tests (run under torchrun by tests/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc-per-node N tests/dist_worker.py OUT_DIR MODE

Builds the tiny base + SSR cascade with fixed weights, generates with the pipeline shared among the ranks
and saves what this rank got to OUT_DIR/rank{r}.pt. MODE "ok" runs normally; "raise" makes rank 1 raise in
its second SSR model call; "die" makes rank 1 exit without a word in the same place.
"""
from __future__ import annotations

import os
import sys

import torch

import stunet

out_dir, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)  # the same CPU math on every world size
stunet.distributed.init(timeout=20)
rank = int(os.environ["RANK"])

torch.manual_seed(0)
base = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).eval()
ssr = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", in_channels=6, noise_aug=True, low_res_size=8,
                                                    sample_size=16, window_frames=6, window_overlap=2)).eval()
encoder = stunet.text.tiny_random_t5(base.config.text_dim, seed=0)
pipe = stunet.Pipeline(base, encoder, ssr, progress=False, parallel="auto")

if mode != "ok" and rank == 1:
    backend, calls = pipe.ssr_stage.backend, []

    class Failing:  # the SSR backend, failing on its second call
        def __getattr__(self, name):
            return getattr(backend, name)

        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                if mode == "die":
                    os._exit(3)
                raise RuntimeError("injected failure")
            return backend(*args, **kwargs)

    pipe.ssr_stage.backend = Failing()

result = pipe(["a cat", "a dog"], num_frames=8, height=8, width=8, num_inference_steps=2, guidance_scale=3.0,
              guidance_rescale=0.5, sampler="dpmpp2m", seed=7, output_type="pt",
              ssr=stunet.SSROptions(num_inference_steps=2, batch_size=1, guidance_scale=2.0))
stats = pipe.parallel.stats
torch.save(dict(frames=result.frames, low=result.low_res_frames, world=pipe.parallel.world_size,
                steps={k: v.steps for k, v in stats.items()},
                share=max(v.communication_share for v in stats.values())), os.path.join(out_dir, f"rank{rank}.pt"))
stunet.distributed.leave(0)
