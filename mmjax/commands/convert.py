"""`mmjax convert open_clip --model-config M --checkpoint F --workdir W`: imports open_clip / OpenAI CLIP weights
into a fresh mmjax workdir (`mmjax.interop.open_clip`)."""

from __future__ import annotations

from mmjax.interop.open_clip import convert_open_clip


def main(args) -> int:
    convert_open_clip(args.model_config, args.checkpoint, args.workdir, text_ids=args.text_ids,
                      bpe_path=args.bpe_path, scan_layers=args.scan_layers)
    return 0
