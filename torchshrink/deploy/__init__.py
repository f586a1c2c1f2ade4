"""Deployment chosen by measurement: precision x runtime candidates built from the model, each checked for
quality against a budget and timed interleaved on this machine; the fastest passing one is written.
Causal language models go through :func:`deploy_lm` (generation timed, perplexity as the quality)."""

from torchshrink.deploy.api import DeployError, DeployResult, deploy
from torchshrink.deploy.candidates import RUNTIMES, Candidate
from torchshrink.deploy.lm import LM_RUNTIMES, LMDeployResult, deploy_lm

__all__ = ["LM_RUNTIMES", "RUNTIMES", "Candidate", "DeployError", "DeployResult", "LMDeployResult", "deploy", "deploy_lm"]
