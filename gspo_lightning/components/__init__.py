"""The swappable algorithm components: ratio, advantage, clip, KL, aggregation and their composition."""
