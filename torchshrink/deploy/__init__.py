"""Deployment chosen by measurement: precision x runtime candidates built from the model, each checked for
quality against a budget and timed interleaved on this machine; the fastest passing one is written."""

from torchshrink.deploy.api import DeployError, DeployResult, deploy
from torchshrink.deploy.candidates import RUNTIMES, Candidate

__all__ = ["RUNTIMES", "Candidate", "DeployError", "DeployResult", "deploy"]
