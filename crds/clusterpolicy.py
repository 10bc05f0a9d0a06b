"""ClusterPolicy: cluster-wide HA policy; one object, named `default`, read by the controller.

Its `admission` section is admission control (docs/ha.md, "Admission control"): keep enough
failover capacity that every started VM could be placed again after the worst
`hostFailuresTolerated` hosts fail, or keep `reservePercent` of the cluster's vcpus and memory
free. `mode: enforce` refuses (apply) or holds Pending (the HA controller) a start or change
that would break it; `mode: warn` lets it through with a Warning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .meta import ObjectMeta, Resource, Status, Strict

POLICY_NAME = "default"
"""The only ClusterPolicy the controller reads; others are refused at validation."""

AdmissionMode = Literal["enforce", "warn"]


class AdmissionPolicy(Strict):
    host_failures_tolerated: int | None = Field(
        default=None, ge=0, le=64, alias="hostFailuresTolerated"
    )
    """Every started VM must still be placeable after this many hosts fail (the worst ones)."""
    reserve_percent: int | None = Field(default=None, ge=1, le=99, alias="reservePercent")
    """Or: this share of the schedulable hosts' vcpus and memory stays unused."""
    mode: AdmissionMode = "enforce"
    """`enforce`: refuse or hold; `warn`: allow with a Warning."""

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> AdmissionPolicy:
        rules = [self.host_failures_tolerated, self.reserve_percent]
        if sum(rule is not None for rule in rules) != 1:
            raise ValueError("admission needs exactly one of hostFailuresTolerated, reservePercent")
        return self

    def describe(self) -> str:
        """`tolerate 1 host failure (enforce)`, `reserve 25% (warn)`."""
        if self.host_failures_tolerated is not None:
            count = self.host_failures_tolerated
            rule = f"tolerate {count} host failure{'' if count == 1 else 's'}"
        else:
            rule = f"reserve {self.reserve_percent}%"
        return f"{rule} ({self.mode})"


class ClusterPolicySpec(Strict):
    admission: AdmissionPolicy | None = None
    """None: no admission control."""


class ClusterPolicy(Resource[ClusterPolicySpec, Status]):
    kind: Literal["ClusterPolicy"] = "ClusterPolicy"
    status: Status = Field(default_factory=Status)

    @field_validator("metadata")
    @classmethod
    def _singleton(cls, metadata: ObjectMeta) -> ObjectMeta:
        if metadata.name != POLICY_NAME:
            raise ValueError(
                f"name: a ClusterPolicy is named {POLICY_NAME!r}, not {metadata.name!r}"
            )
        return metadata
