"""The MS-lesion segmentation application built on the fused Tversky loss.

Needs the ``[app]`` extra (nibabel, matplotlib, scipy, tqdm); ``import fasttversky``
never imports this package. Where each concern lives:

* ``cli``        the ``fasttversky`` command: argparse, calls, printing, exit statuses
* ``config``     every setting declared once (ModelConfig, DataConfig, TrainConfig,
  PredictConfig -> RunSettings = ``run.json``); ``presets``: named experiment presets
* ``pipeline``   synth, train_run, load_run, predict_dataset, evaluate_folder, demo
  (library functions that raise ``errors.ConfigError`` / ``errors.DataError``)
* ``experiment`` the paper's (alpha, beta) sweep, Table 1 / Fig. 2 writers, transplants
* ``bench``      the packaged loss benchmark behind ``fasttversky bench``
* ``models``     UNet3D; ``training``: train loop, checkpoints, predict, inference
* ``data``       NIfTI subjects (io), transforms, dataset/batches, augment, phantoms and
  real-mask transplants (synth)
* ``metrics``, ``lesion_metrics``, ``plots``: evaluation and figures

Nothing is imported here, so ``fasttversky.app.cli`` starts without torch.
"""
