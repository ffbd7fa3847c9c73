"""The parts of `bench/gpu_suite.py`: one prepared run that measures every figure only a GPU can give.

`measure.py` holds the clocks, probes and memory and utilisation readers every part uses; `report.py` the
results and the JSON / Markdown they are written as; `workspace.py` the data, store and run the parts share;
then one module per part (`extraction.py` with `compiled.py`, `heads.py`, `slide.py`, `pretraining.py`).
"""
