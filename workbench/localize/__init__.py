"""Localisation of the components (MLP neurons, attention heads) that carry the White-Black answer gap."""
