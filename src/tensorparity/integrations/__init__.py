"""Framework integrations: each imports its framework only when used (an optional extra).

* :mod:`tensorparity.integrations.lightning`: the resume check of a real ``lightning.Trainer``
  run resumed through ``trainer.fit(..., ckpt_path=...)``.

The pytest plugin is :mod:`tensorparity.pytest_plugin`.
"""
