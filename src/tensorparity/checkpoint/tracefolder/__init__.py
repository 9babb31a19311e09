"""The trace folder as a format: ``manifest.json`` plus safetensors shards (one ``rank-<r>/``
folder per process of a distributed run), its records and statistics, the streaming writer and
the validating reader.

A trace is written by :func:`tensorparity.trace.capture` and read by :meth:`Trace.open
<tensorparity.checkpoint.tracefolder.reader.Trace.open>`; :func:`tensorparity.open` opens it as
any other checkpoint (:mod:`.as_checkpoint`). The capture, alignment and comparison of traces
live one layer up, in :mod:`tensorparity.trace`.
"""
