"""From the user's nn.Module to a torch.fx graph: the value-carrying tracer (`fxq.trace`), its shape guards, node
shape metadata, read-only graph queries, and how a quantized model's calls are bound to the graph's inputs."""
