"A checkpoint that runs code when unpickled unsafely: the payload the loaders must refuse."
import torch

class RunsCode:
    "A checkpoint entry whose unpickling would call os.system: what a malicious file does."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self):
        import os
        return (os.system, (self.cmd,))


def crafted(path, marker, **extra):
    "Write a checkpoint at `path` that would create `marker` if it were unpickled with weights_only=False."
    torch.save(dict(extra, payload=RunsCode(f'touch {marker}')), path)
    return path
