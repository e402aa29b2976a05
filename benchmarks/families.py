"""Every family's detached Jacobian on its tiny random model: exactness and backend parity (float32, CPU).

Per family of :data:`toolkit.models.tiny.TINY_ARCHITECTURES` (2 blocks, width 64, perturbed norm
weights, a 6-token prompt): the largest change of the logits under the freeze; the detached
reconstruction error ``|sum_i J_i x_i + c - y| / |y|`` at the output and at the middle boundary
``h_1``; the largest entry-wise difference of the output Jacobian through nnsight and through
TransformerLens' bridge from the direct one; and of the hidden states ``h_0..h_L`` between the two
backends ("-" where the bridge has no adapter for the family).

``python -m benchmarks.families [--out DIR]`` (or ``python -m benchmarks.run --only families``).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.common import print_table, write_json

IDS = torch.tensor([3, 17, 42, 7, 99, 5])


def measure(arch: str, tokenizer) -> dict:
    from toolkit.backends import make_backend
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.jacobian.freeze import detached
    from toolkit.jacobian.freeze_rules import FreezeError
    from toolkit.jacobian.through_backend import backend_jacobian
    from toolkit.families import family_hf_class, tl_bridge_supports
    from toolkit.models.tiny import tiny_hf_model

    hf = tiny_hf_model(arch, vocab_size=tokenizer.vocab_size)
    hf_class = family_hf_class(arch)
    with torch.no_grad():
        ref_logits = hf(IDS[None], use_cache=False).logits
        with detached(hf):
            frozen_logits = hf(IDS[None], use_cache=False).logits
    direct = detached_jacobian(copy.deepcopy(hf), IDS, target="output")
    middle = detached_jacobian(copy.deepcopy(hf), IDS, target=1)
    via_nn = backend_jacobian(make_backend(hf, tokenizer, backend="nnsight"), IDS, target="output")
    row = {"family": arch, "transformers class": hf_class, "TL bridge": tl_bridge_supports(hf_class),
           "freeze max |dlogits|": (frozen_logits - ref_logits).abs().max().item(),
           "rec err output": direct.reconstruction_error, "rec err h_1": middle.reconstruction_error,
           "nnsight max |dJ|": (via_nn.jacobian - direct.jacobian).abs().max().item(),
           "TL max |dJ|": "-", "nnsight vs TL max |dh|": "-"}
    if row["TL bridge"]:
        ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
        states_nn = make_backend(hf, tokenizer, backend="nnsight").hidden_states(ids)
        tl = make_backend(hf, tokenizer, backend="tl")
        try:
            via_tl = backend_jacobian(tl, IDS, target="output")
            row["TL max |dJ|"] = (via_tl.jacobian - direct.jacobian).abs().max().item()
        except FreezeError as err:  # Mamba through the bridge: the bridge passes a cache to the mixer
            row["TL max |dJ|"] = f"refused: {str(err).split(':')[-1].strip()}"
        row["nnsight vs TL max |dh|"] = (tl.hidden_states(ids) - states_nn).abs().max().item()
    return row


def _shown(rows: list[dict]) -> list[dict]:
    return [{k: f"{v:.1e}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def run(out: Path, families: tuple[str, ...] | None = None) -> list[dict]:
    from transformers import AutoTokenizer
    from toolkit.models.tiny import TINY_ARCHITECTURES
    from toolkit.models.weights import SMOLLM2, converted_folder

    tokenizer = AutoTokenizer.from_pretrained(str(converted_folder(SMOLLM2)))  # the bridge needs one
    rows = []
    for arch in families or TINY_ARCHITECTURES:
        rows.append(measure(arch, tokenizer))
        print_table(_shown(rows[-1:]))
    print_table(_shown(rows))
    write_json(out, "families", rows, {"ids": IDS.tolist(), "n_layers": 2, "width": 64, "dtype": "float32"})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--family", action="append", help="only these families (default: all tiny ones)")
    args = parser.parse_args()
    run(Path(args.out), tuple(args.family) if args.family else None)
