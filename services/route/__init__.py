"""The route service: tenant limits and priority lanes, exact and semantic response caches,
a trained request classifier and a declarative policy that writes the routing slip
(see :mod:`.app`)."""
