"""torch.hub entry points: every catalogue entry, with dashes as underscores.

    torch.hub.load("path/to/attention-zoo", "linear_transformer", source="local", dim=64)
"""

import zoo

dependencies = ["torch", "einops", "yaml"]


def _entry_point(name: str):
    def build(**kwargs):
        return zoo.create(name, **kwargs)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"{zoo.entry(name).title} (catalogue id {name!r}); keywords as zoo.create."
    return build


for _name in zoo.names():
    globals()[_name.replace("-", "_")] = _entry_point(_name)
