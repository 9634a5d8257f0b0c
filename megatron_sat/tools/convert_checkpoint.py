"""HF Llama ⇄ megatron-sat checkpoint conversion, and TP resharding.

Why it works on state dicts only: users convert on a login node or a laptop, where the
full training setup (distributed init, model build, GPUs) is unavailable; a converter
that needs it is a top complaint (REFERENCE.md §3).  The layout facts live in
:mod:`llama_layout`; the on-disk format in :mod:`ckpt_format`.  The model shape and the
source ``config.json`` are recorded, so ``pretrain_llama.py --load`` can check the shape
and ``megatron-to-hf`` can restore the original config fields (token ids ...).

Memory: the whole model is held in CPU memory once (plus one TP-split copy).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_sat.tools import llama_layout
from megatron_sat.tools.ckpt_format import (dtype_name, load_megatron_checkpoint,
                                            save_megatron_checkpoint)
from megatron_sat.tools.cli import ToolError, atomic_dir, check_output_free, make_parser, run_main
from megatron_sat.tools.hf_llama import (hf_config_from_shape, load_hf_checkpoint, parse_dtype,
                                         save_hf_checkpoint)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass
class ConversionReport:
    source: Path
    output: Path
    direction: str
    num_parameters: int
    vocab_size: int
    padded_vocab_size: int
    tp: int
    dtype: str

    def summary(self) -> str:
        return (f"{self.direction}: {self.source} -> {self.output}\n"
                f"  {self.num_parameters:,} parameters, dtype {self.dtype}, TP={self.tp}, "
                f"vocabulary {self.vocab_size} (padded {self.padded_vocab_size})")


def _log(msg: str) -> None:
    """Stage messages on stderr: loading and saving a 70B model takes minutes."""
    print(msg, file=sys.stderr, flush=True)


def _check_tp(shape, tp: int) -> None:
    try:
        shape.check_tp(tp)
    except ValueError as exc:
        raise ToolError(str(exc).replace("--tensor-model-parallel-size", "--target-tp")) from None


def _count(state_dict) -> int:
    return sum(t.numel() for t in state_dict.values() if torch.is_tensor(t))


def convert_hf_to_megatron(hf_dir: str | Path, save_dir: str | Path, target_tp: int = 1,
                           dtype: Optional[str] = None, make_vocab_size_divisible_by: int = 128,
                           overwrite: bool = False) -> ConversionReport:
    """HF Llama folder → megatron-sat checkpoint split for ``target_tp`` ranks."""
    check_output_free([save_dir], overwrite, inputs=[hf_dir])
    _log(f"loading HF checkpoint {hf_dir} ...")
    shape, config, hf = load_hf_checkpoint(hf_dir, make_vocab_size_divisible_by)
    _check_tp(shape, target_tp)
    _log(f"splitting {len(hf)} tensors for TP={target_tp} ...")
    ranks = llama_layout.hf_to_megatron(hf, shape, target_tp, parse_dtype(dtype))
    _log(f"saving {save_dir} ...")
    with atomic_dir(save_dir, overwrite) as tmp:
        save_megatron_checkpoint(tmp, ranks, shape, source=f"hf:{Path(hf_dir).resolve()}",
                                 extra_meta={"hf_config": config})
    return ConversionReport(Path(hf_dir), Path(save_dir), "hf-to-megatron", _count(hf),
                            shape.vocab_size, shape.padded_vocab_size(target_tp), target_tp,
                            dtype_name(ranks[0]))


def convert_megatron_to_hf(load_dir: str | Path, save_dir: str | Path,
                           dtype: Optional[str] = None, tokenizer_dir: Optional[str] = None,
                           overwrite: bool = False) -> ConversionReport:
    """megatron-sat checkpoint → HF folder: TP merged, vocabulary padding trimmed."""
    check_output_free([save_dir], overwrite, inputs=[load_dir])
    _log(f"loading megatron-sat checkpoint {load_dir} ...")
    ckpt = load_megatron_checkpoint(load_dir)
    _log(f"merging TP={ckpt.tp}, trimming vocabulary {ckpt.padded_vocab_size} -> "
         f"{ckpt.shape.vocab_size} ...")
    hf = llama_layout.megatron_to_hf(ckpt.rank_models(), ckpt.shape, parse_dtype(dtype))
    config = hf_config_from_shape(ckpt.shape, dtype_name(hf), ckpt.meta.get("hf_config"))
    _log(f"saving {save_dir} ...")
    with atomic_dir(save_dir, overwrite) as tmp:
        save_hf_checkpoint(tmp, hf, config)
        if tokenizer_dir:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
    return ConversionReport(Path(load_dir), Path(save_dir), "megatron-to-hf", _count(hf),
                            ckpt.shape.vocab_size, ckpt.padded_vocab_size, ckpt.tp, dtype_name(hf))


def reshard_megatron(load_dir: str | Path, save_dir: str | Path, target_tp: int,
                     overwrite: bool = False) -> ConversionReport:
    """megatron-sat checkpoint at TP=a → the same weights at TP=``target_tp``."""
    check_output_free([save_dir], overwrite, inputs=[load_dir])
    _log(f"loading megatron-sat checkpoint {load_dir} ...")
    ckpt = load_megatron_checkpoint(load_dir)
    _check_tp(ckpt.shape, target_tp)
    _log(f"resharding TP={ckpt.tp} -> TP={target_tp} ...")
    full = llama_layout.megatron_to_hf(ckpt.rank_models(), ckpt.shape)
    ranks = llama_layout.hf_to_megatron(full, ckpt.shape, target_tp)
    extra = {k: v for k, v in ckpt.meta.items() if k == "hf_config"}
    with atomic_dir(save_dir, overwrite) as tmp:
        save_megatron_checkpoint(tmp, ranks, ckpt.shape, iteration=ckpt.iteration,
                                 source=f"megatron:{Path(load_dir).resolve()}", extra_meta=extra)
    return ConversionReport(Path(load_dir), Path(save_dir), "megatron-to-megatron",
                            _count(full),
                            ckpt.shape.vocab_size, ckpt.shape.padded_vocab_size(target_tp),
                            target_tp, dtype_name(ranks[0]))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if src.is_file():  # a bare tokenizer.model
        shutil.copy2(src, dst / "tokenizer.model")
        return
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not found:
        raise ToolError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in '{src}'; pass "
                        f"the tokenizer folder or tokenizer.model with --tokenizer-dir")
    for f in found:
        shutil.copy2(src / f, dst / f)


EXAMPLES = """\
  # HF Llama-2 folder -> megatron-sat checkpoint for 2-way tensor parallelism, in bf16
  python tools/convert_checkpoint.py hf-to-megatron --load-dir Llama-2-7b-hf \\
      --save-dir ckpt/llama2-7b-tp2 --target-tp 2 --dtype bf16
  # train: pretrain_llama.py --load ckpt/llama2-7b-tp2 --finetune ...

  # trained megatron-sat checkpoint (any TP) -> HF folder, with the tokenizer copied in
  python tools/convert_checkpoint.py megatron-to-hf --load-dir ckpt/run1 \\
      --save-dir hf/run1 --tokenizer-dir Llama-2-7b-hf

  # change the TP degree of a megatron-sat checkpoint
  python tools/convert_checkpoint.py megatron-to-megatron --load-dir ckpt/run1 \\
      --save-dir ckpt/run1-tp1 --target-tp 1
"""


def build_parser():
    p = make_parser("convert_checkpoint.py",
                    "Convert Llama checkpoints between HF and megatron-sat formats "
                    "(no distributed setup needed).", EXAMPLES)
    sub = p.add_subparsers(dest="direction", required=True)
    for name, help_ in (("hf-to-megatron", "HF folder -> megatron-sat checkpoint"),
                        ("megatron-to-hf", "megatron-sat checkpoint -> HF folder"),
                        ("megatron-to-megatron", "reshard a megatron-sat checkpoint")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--load-dir", required=True, help="input checkpoint folder")
        s.add_argument("--save-dir", required=True, help="output folder (must not exist)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if name != "megatron-to-hf":
            s.add_argument("--target-tp", "--target-tensor-parallel-size", dest="target_tp",
                           type=int, default=1, help="TP degree to split for (default 1)")
        if name != "megatron-to-megatron":
            s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                           help="output dtype (default: keep the stored dtype)")
        if name == "hf-to-megatron":
            s.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                           help="pad the vocabulary to a multiple of this × TP (default 128)")
        if name == "megatron-to-hf":
            s.add_argument("--tokenizer-dir", default=None,
                           help="tokenizer folder (or tokenizer.model) to copy into the output")
    return p


def _run(args) -> None:
    if args.direction == "hf-to-megatron":
        rep = convert_hf_to_megatron(args.load_dir, args.save_dir, args.target_tp, args.dtype,
                                     args.make_vocab_size_divisible_by, args.overwrite)
    elif args.direction == "megatron-to-hf":
        rep = convert_megatron_to_hf(args.load_dir, args.save_dir, args.dtype,
                                     args.tokenizer_dir, args.overwrite)
    else:
        rep = reshard_megatron(args.load_dir, args.save_dir, args.target_tp, args.overwrite)
    print(rep.summary())


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
