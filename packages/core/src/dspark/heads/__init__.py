"""Heads on top of the parallel drafter backbone: Markov / RNN bias heads that fix
suffix decay, the confidence head, and Sequential Temperature Scaling."""

from dspark.heads.calibration import STSCalibrator, auc, expected_calibration_error
from dspark.heads.confidence import ConfidenceHead
from dspark.heads.markov import MarkovHead
from dspark.heads.rnn import RNNHead

__all__ = ["MarkovHead", "RNNHead", "ConfidenceHead", "STSCalibrator", "expected_calibration_error", "auc"]
