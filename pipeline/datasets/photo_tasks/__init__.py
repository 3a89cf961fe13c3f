"""Ready-made ranking tasks on real photographs with exact ground truth (docs/photo-tasks.md).

`build_photo_tasks(out_dir, config_for_size("small"))` writes WebDataset tars, a manifest and a
record of how every image was made: distortion strength (quality), measured attributes
(colourfulness, contrast, brightness) and counts of pasted cut-outs.
"""

from rankpipe.pipeline.datasets.photo_tasks.build import (
    PhotoTasksConfig,
    PhotoTasksResult,
    build_photo_tasks,
    config_for_size,
)

__all__ = ["PhotoTasksConfig", "PhotoTasksResult", "build_photo_tasks", "config_for_size"]
