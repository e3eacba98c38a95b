"""Executors: how a compression runs, apart from what it computes (the rank methods).

`source` says where the weights are (a loaded model, or a checkpoint read tensor by tensor onto
a meta skeleton), `solver` decomposes one weight however it arrives, `datafree` and `sequential`
run the passes (all layers at once; block by block with calibration data), `sensitivity`
measures the output sensitivity block by block (output-aware ranks), `writer` writes the
shards, `parallel` splits the layers over processes. The methods never know which runs them.
"""
