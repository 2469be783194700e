"""Stepline's client side: start workflows, read and control their instances."""

from producer.client import Client
from producer.models import AttemptInfo, EventInfo, InstanceInfo, StepInfo
from producer.producer import Producer, WorkflowRef

__all__ = [
    "AttemptInfo",
    "Client",
    "EventInfo",
    "InstanceInfo",
    "Producer",
    "StepInfo",
    "WorkflowRef",
]
