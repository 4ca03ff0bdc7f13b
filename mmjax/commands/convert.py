"""`mmjax convert open_clip --model-config M --checkpoint F --workdir W`: imports open_clip / OpenAI CLIP weights
into a fresh mmjax workdir (`mmjax.interop.open_clip`)."""

from __future__ import annotations

from mmjax.interop.open_clip_coca import convert


def main(args) -> int:
    """CoCa configs go to the CoCa mapping (`mmjax.interop.open_clip_coca`), every other one to CLIP's."""
    convert(args.model_config, args.checkpoint, args.workdir, text_ids=args.text_ids,
            bpe_path=args.bpe_path, scan_layers=args.scan_layers)
    return 0
