"""`mmjax generate`: text from images, or images from text, by what the workdir's model does.

    mmjax generate --workdir W --images a.png b.jpg [--prompt "..."] [--beam 4 | --top-p 0.9]
one line of generated text per image, from a captioner's workdir (`mmjax.load(W).caption`), in the order given;

    mmjax generate --workdir W --prompt "a photo of the number seven" [--prompt ...] --num 16 [--guidance 3]
        [--rerank-with W_clip] --out DIR
images from a text-to-image workdir (`mmjax.load(W).generate_images`): DIR/<prompt index>_<sample index>.png and
DIR/grid.png (DIR may be a bucket URL), re-ranked by a contrastive workdir's image-text similarity when given.

Images are read through `mmjax.storage` (local paths or gs:// / s3:// URLs), any size and channel count
(converted as `encode_image` does). Greedy decoding by default; `--beam K` beam search; `--top-p P` nucleus
sampling (`--seed`). A beam size <= 0, a prompt longer than the decoder's context or an unreadable image end as one
`mmjax: error: ...` line.
"""

from __future__ import annotations

import argparse
import io

from PIL import Image, UnidentifiedImageError

from mmjax import storage
from mmjax.errors import MmjaxError
from mmjax.inference import load
from mmjax.tasks.text_to_image import generate_to_folder


class GenerateError(MmjaxError, ValueError):
    """A bad `mmjax generate` request (an image that cannot be read, conflicting options)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a captioner's workdir (task 'coca')")
    p.add_argument("--images", nargs="+", default=None, help="image files or URLs (PNG, JPEG, ...) to caption")
    p.add_argument("--prompt", action="append", default=None,
                   help="with --images: text the caption continues; with --out: a caption to draw (repeatable)")
    p.add_argument("--out", default=None, help="text to image: the folder (or URL) the PNGs go to")
    p.add_argument("--num", type=int, default=16, help="text to image: samples per prompt")
    p.add_argument("--guidance", type=float, default=None,
                   help="text to image: classifier-free guidance scale (default: the model's)")
    p.add_argument("--rerank-with", default=None,
                   help="text to image: a contrastive workdir whose image-text similarity orders the samples")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--beam", type=int, default=None, help="beam search with this many beams")
    how.add_argument("--top-p", type=float, default=None, help="nucleus sampling keeping this probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --top-p)")
    p.add_argument("--step", type=int, default=None, help="this checkpoint (default: the latest)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MMJAX_DEBUG=1)")


def read_image(path: str) -> Image.Image:
    """One image file or URL -> a loaded PIL image (GenerateError when it is not an image)."""
    try:
        image = Image.open(io.BytesIO(storage.read_bytes(path)))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise GenerateError(f"--images: {path}: no such file") from None
        raise GenerateError(f"--images: {path} is not a readable image ({error})") from None
    return image


def draw(args) -> int:
    """Text to image: the PNGs of `--num` samples per `--prompt` in `--out`."""
    if not args.prompt:
        raise GenerateError("--out (text to image) needs at least one --prompt")
    if args.num < 1:
        raise GenerateError(f"--num must be >= 1; got {args.num}")
    model = load(args.workdir, step=args.step)
    if not hasattr(model, "generate_images"):
        raise GenerateError(f"{args.workdir}: its model does not draw images (a text-to-image workdir does); "
                            f"for captions pass --images instead of --out")
    rerank = load(args.rerank_with) if args.rerank_with else None
    try:
        paths = generate_to_folder(model, args.prompt, args.num, args.guidance, rerank, args.out, args.seed)
    except ValueError as error:  # a prompt too long for the text context, ...
        raise GenerateError(str(error)) from None
    print(f"mmjax: {len(paths) - 1} images and the grid in {storage.join(args.out, 'grid.png')}")
    return 0


def main(config, args) -> int:
    del config  # the workdir's own config is used
    if args.out is not None:
        return draw(args)
    if not args.images:
        raise GenerateError("give --images to caption, or --prompt ... --out DIR to draw images")
    if args.beam is not None and args.beam < 1:
        raise GenerateError(f"--beam must be >= 1; got {args.beam}")
    if args.prompt and len(args.prompt) > 1:
        raise GenerateError("captions continue one --prompt; give it once")
    images = [read_image(p) for p in args.images]
    model = load(args.workdir, step=args.step)
    lines = model.caption(images, beam=args.beam or 1, top_p=1.0 if args.top_p is None else args.top_p,
                          prompt=args.prompt[0] if args.prompt else "", seed=args.seed)
    for line in lines:
        print(line.replace("\n", " "))
    return 0
