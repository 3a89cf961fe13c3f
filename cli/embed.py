"""`rankpipe embed`: run the frozen CLIP over tars and cache its tokens in a Zarr store."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rankpipe.cli.params import NonEmptyPath


@click.command()
@click.argument("source", metavar="MANIFEST_OR_SHARD_PATTERN")
@click.option("--store", "store_path", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Zarr store folder to create or resume, e.g. feats/x.zarr.")
@click.option("--model", required=True, help="open_clip model name, e.g. ViT-B-16 (rankpipe-tiny-vit for tests).")
@click.option("--pretrained", default="none", show_default=True,
              help="open_clip pretrained tag (e.g. openai), a local checkpoint file, or 'none' for random weights.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights (--pretrained none).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda decodes JPEGs on the GPU).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True, type=click.IntRange(min=0),
              help="Decoding processes, each reading one tar at a time (0: decode in the main process).")
@click.option("--mode", default="incremental", show_default=True, type=click.Choice(["incremental", "overwrite"]),
              help="incremental: resume a store made from the same inputs; overwrite: replace it.")
@click.option("--resize", default="squash", show_default=True, type=click.Choice(["squash", "crop"]),
              help="squash: scale both sides to the backbone's resolution, nothing cut off (the paper's); "
                   "crop: scale the shortest side, then cut out the centre (the model's own eval transform).")
@click.option("--flip-view", is_flag=True,
              help="Also embed every image mirrored left to right, for training's flip augmentation "
                   "(twice the image compute and token bytes; docs/store.md).")
@click.option("--compress", is_flag=True, help="zstd-compress the arrays (fp16 features barely compress).")
@click.option("--label", "labels", multiple=True,
              help="Label name in the samples' json; only with a bare shard pattern; pair each with --query "
                   "(none: an unlabelled collection).")
@click.option("--query", "queries", multiple=True, help="The sentence that ranks by the matching --label.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--cluster", help="local:N: embed the tars on a dask LocalCluster of N worker processes (one GPU each "
                                "with --device cuda); --workers is then unused.")
@click.option("--scheduler", help="Address of a running dask scheduler (tcp://host:8786) whose workers embed the tars; "
                                  "they must reach the tars and --store at the same paths.")
def embed(source: str, store_path: Path, model: str, pretrained: str, seed: int, device: str, batch_size: int,
          workers: int, mode: str, resize: str, flip_view: bool, compress: bool, labels: tuple[str, ...], queries: tuple[str, ...],
          no_progress: bool, cluster: str | None, scheduler: str | None) -> None:
    """Run the frozen CLIP over every tar of MANIFEST_OR_SHARD_PATTERN and cache its tokens in --store.

    MANIFEST_OR_SHARD_PATTERN is a manifest YAML file, or a brace pattern of tars
    ('shards/x-{000000..000009}.tar') together with --label/--query pairs. Without labels (a
    manifest with `labels: []`, e.g. from `rankpipe shards` without --label, or a pattern without
    --label) the store holds an unlabelled collection: image tokens only, for `rankpipe rank --store`.
    Rerunning resumes an unfinished store; a finished one is left as it is.
    """
    from rankpipe.pipeline.cluster import parse_cluster
    from rankpipe.pipeline.data.manifest import load_manifest
    from rankpipe.pipeline.embed.backbone import BackboneSpec
    from rankpipe.pipeline.embed.job import embed as run_embed
    from rankpipe.pipeline.embed.job import manifest_for_pattern

    if len(labels) != len(queries):
        raise click.UsageError("give one --query for each --label")
    if source.endswith((".yaml", ".yml")):
        if labels:
            raise click.UsageError("--label/--query are only for a bare shard pattern; a manifest names its labels")
        manifest = load_manifest(source)
    else:
        manifest = manifest_for_pattern(source, list(zip(labels, queries)))
    cluster_spec = parse_cluster(cluster, scheduler)
    spec = BackboneSpec(model, pretrained, seed, resize=resize)
    if cluster_spec is None:
        summary = run_embed(manifest, store_path, spec, device=device, batch_size=batch_size, workers=workers,
                            mode=mode, compress=compress, progress=not no_progress, flip_view=flip_view)
    else:
        from tqdm import tqdm

        from rankpipe.pipeline.cluster import open_client
        from rankpipe.pipeline.embed.distributed import embed_distributed

        with open_client(cluster_spec, device) as client, tqdm(unit="tar", disable=no_progress, desc="embed") as bar:
            def show(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            summary = embed_distributed(manifest, store_path, spec, client, device=device, batch_size=batch_size,
                                        mode=mode, compress=compress, progress=show, flip_view=flip_view)
    click.echo(summary.line())
