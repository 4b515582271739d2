"""Valid Care Connect resources (synthetic, shaped like what the demo serves) to mutate."""

from __future__ import annotations

import copy
from typing import Any

CC = "https://fhir.hl7.org.uk/STU3/StructureDefinition/"
CCCS = "https://fhir.hl7.org.uk/STU3/CodeSystem/"
NHS = "https://fhir.nhs.uk/Id/nhs-number"

_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "100001",
    "meta": {"profile": [CC + "CareConnect-Patient-1"],
             "lastUpdated": "2025-06-01T10:15:00+01:00"},
    "extension": [
        {"url": CC + "Extension-CareConnect-EthnicCategory-1",
         "valueCodeableConcept": {"coding": [{"system": CCCS + "CareConnect-EthnicCategory-1",
                                              "code": "A", "display": "British, Mixed British"}]}},
        {"url": CC + "Extension-CareConnect-NHSCommunication-1",
         "extension": [{"url": "language", "valueCodeableConcept": {"coding": [
             {"system": CCCS + "CareConnect-HumanLanguage-1", "code": "en",
              "display": "English"}]}}]},
    ],
    "identifier": [
        {"system": NHS, "value": "9990000018",
         "extension": [{"url": CC + "Extension-CareConnect-NHSNumberVerificationStatus-1",
                        "valueCodeableConcept": {"coding": [
                            {"system": CCCS + "CareConnect-NHSNumberVerificationStatus-1",
                             "code": "01", "display": "Number present and verified"}]}}]},
        {"system": "https://fhir.demo-trust.nhs.uk/Id/pas-number", "value": "D0000001"},
        {"system": "https://fhir.demo-trust.nhs.uk/Id/old-hospital-number", "value": "D0000005",
         "period": {"start": "2003-04-11T00:00:00+01:00", "end": "2011-05-16T00:00:00+01:00"}},
    ],
    "active": True,
    "name": [{"use": "official", "family": "Smith", "given": ["Jane", "Elizabeth"],
              "prefix": ["Mrs"]}],
    "telecom": [{"system": "phone", "use": "home", "value": "01632 960001"},
                {"system": "email", "use": "home", "value": "jane.smith@example.com"}],
    "gender": "female",
    "birthDate": "1965-04-12",
    "address": [{"use": "home", "line": ["7 Church Lane", "Roundhay"], "city": "Leeds",
                 "postalCode": "LS8 2DR", "period": {"start": "2018-06-30T00:00:00+01:00"}}],
    "maritalStatus": {"coding": [{"system": "http://hl7.org/fhir/v3/MaritalStatus",
                                  "code": "M", "display": "Married"}]},
    "generalPractitioner": [{"reference": "Practitioner/1"}, {"reference": "Organization/2"}],
}

_ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "1",
    "meta": {"profile": [CC + "CareConnect-Encounter-1"]},
    "identifier": [{"system": "https://fhir.demo-trust.nhs.uk/Id/spell-number",
                    "value": "IP00000001"}],
    "status": "finished",
    "class": {"system": "http://hl7.org/fhir/v3/ActCode", "code": "IMP",
              "display": "inpatient encounter"},
    "subject": {"reference": "Patient/100001"},
    "participant": [{"individual": {"reference": "Practitioner/34"}}],
    "period": {"start": "2023-09-04T11:30:00+01:00", "end": "2023-09-07T16:00:00+01:00"},
    "length": {"value": 4590, "unit": "min", "system": "http://unitsofmeasure.org",
               "code": "min"},
    "hospitalization": {"extension": [
        {"url": CC + "Extension-CareConnect-AdmissionMethod-1",
         "valueCodeableConcept": {"coding": [{"system": CCCS + "CareConnect-AdmissionMethod-1",
                                              "code": "21"}]}}]},
    "location": [{"location": {"reference": "Location/2"}}],
    "serviceProvider": {"reference": "Organization/1"},
}


def patient() -> dict[str, Any]:
    return copy.deepcopy(_PATIENT)


def encounter() -> dict[str, Any]:
    return copy.deepcopy(_ENCOUNTER)
