"""Behaviour: what models say (sampling, judging, continuation checks, EM evaluation)."""
