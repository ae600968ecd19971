"""Speculative decoding with SmartSpec: proposers, lossless verification, goodput-chosen proposal length."""

from lmstack.engine.spec.controller import Controller, FixedK, merge_profiles, save_profile
from lmstack.engine.spec.decoder import SpecDecoder
from lmstack.engine.spec.proposers import PROPOSERS, DraftProposer, NgramProposer, Proposer
from lmstack.engine.spec.rejection import greedy_accept, rejection_sample
from lmstack.engine.spec.smartspec import SmartSpec, make_controller

__all__ = ["PROPOSERS", "Controller", "DraftProposer", "FixedK", "NgramProposer", "Proposer", "SmartSpec",
           "SpecDecoder", "greedy_accept", "make_controller", "merge_profiles", "rejection_sample",
           "save_profile"]
