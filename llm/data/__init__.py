"""Text in, batches out; nothing here knows the task, the model or the mesh.

    sources   documents: the embedded corpus, local files or a hub data set, loaded whole or
              read as a stream, through one reader; what a corpus is called (its cache key)
    shards    a corpus tokenized once into shards read memory-mapped (llm.prepare), and the
              cache folder that training prepares into
    stream    a corpus tokenized on the fly, resumable (data.streaming)
    windows   the token stream cut into windows of max_length + 1 tokens (with document masks)
    batches   examples -> per-host batches: a shuffle per epoch fixed by the seed, this
              process's rows, fixed evaluation batches, padding, splits, batches made ahead

A batch is a dict of numpy arrays shaped [grad_accum, micro_batch, ...] holding this process's
share of the global batch. Batch k of the run is a pure function of (seed, k), so the iterator's
whole state is small: it goes into the checkpoint and a resumed run continues exactly. What the
arrays are is the task's business (llm/tasks/): its schema names them.
"""
