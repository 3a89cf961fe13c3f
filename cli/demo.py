"""`rankpipe demo`: the whole pipeline on built-in data, offline, on the CPU."""

from __future__ import annotations

from pathlib import Path

import click

from rankpipe.cli.params import NonEmptyPath


@click.command("demo")
@click.option("--out", "out_dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=Path("rankpipe-demo"),
              show_default=True, help="Folder for every output; an earlier demo folder there is replaced.")
@click.option("--images", "n_images", type=click.IntRange(min=60), default=240, show_default=True,
              help="Images in the built-in dataset.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Adapter training steps.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the backbone and adapter run.")
def demo(out_dir: Path, n_images: int, steps: int, device: str) -> None:
    """Run shards → embed → train → eval on a built-in dataset.

    \b
    The dataset is made offline from scikit-image's sample photographs with exact labels: the
    number of pasted red discs, brightness and colourfulness, one query each. The CLIP backbone is a
    tiny architecture with RANDOM weights (no pretrained weights can be downloaded offline): the
    numbers show that every stage works end to end, not what a pretrained CLIP achieves.
    """
    from tqdm import tqdm

    from rankpipe.adapter.evaluation.evaluate import markdown_table, results_table
    from rankpipe.adapter.experiments.demo import run_demo

    bar: tqdm | None = None

    def on_stage(line: str) -> None:
        nonlocal bar
        if bar is not None:  # training is over: finish its bar before the next stage's line
            bar.close()
            bar = None
        click.echo(line)

    def show(event) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=event.max_steps, unit="step", dynamic_ncols=True)
        bar.update(event.step - bar.n)
        bar.set_postfix({"loss": f"{event.loss.get('total', float('nan')):.4f}",
                         "val_srcc": f"{event.latest_mean_srcc:.4f}"}, refresh=False)

    try:
        paths, results = run_demo(out_dir, n_images=n_images, steps=steps, device=device,
                                  on_stage=on_stage, train_progress=show)
    finally:
        if bar is not None:
            bar.close()
    click.echo(markdown_table(*results_table(results)))
    click.echo(
        f"demo finished (random-weight backbone: the numbers show the pipeline works, not pretrained CLIP quality)\n"
        f"  shards + manifest  {paths.manifest}\n"
        f"  token store        {paths.store}\n"
        f"  best checkpoint    {paths.checkpoint}\n"
        f"  metrics            {paths.eval_dir / 'results.md'}\n"
        f"  rankings           {paths.rankings}\n"
        f"  report             {paths.report / 'index.html'}"
    )
