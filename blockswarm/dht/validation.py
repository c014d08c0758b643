"""DHT record validation: signatures (whose record it is) plus our schema (whether it is well formed).

hivemind's CompositeValidator signs in increasing priority and validates/strips in decreasing priority.
RSASignatureValidator has priority 10, BlockswarmRecordValidator keeps 0, so on validation the signature is
checked and stripped first and our validator sees the bare msgpack value.
"""

from __future__ import annotations

import re

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from .keys import MODEL_INDEX_KEY
from .records import RECORD_TAG, ModelInfo, ServerInfo

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class BlockswarmRecordValidator(RecordValidatorBase):
    """Rejects malformed blockswarm records before any node stores or returns them.

    - A value tagged `"_bs": "server"` must parse as ServerInfo and sit under a subkey carrying an
      "[owner:...]" marker, so RSASignatureValidator guarantees that only its writer can replace it.
    - A value tagged `"_bs": "model"` must parse as ModelInfo and sit under a subkey of MODEL_INDEX_KEY.
    - MODEL_INDEX_KEY holds nothing else, so nobody can wipe the index with a plain value.
    - Other values pass untouched (other applications may share the DHT); so do tags of kinds this version
      does not know, which newer peers may introduce.
    """

    def __init__(self) -> None:
        self._model_index_id = DHTID.generate(source=MODEL_INDEX_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        is_model_index = record.key == self._model_index_id
        has_subkey = record.subkey not in DHTProtocol.RESERVED_SUBKEYS
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return not is_model_index
        kind = value.get(RECORD_TAG) if isinstance(value, dict) else None
        if kind == ServerInfo.KIND:
            return (
                not is_model_index
                and has_subkey
                and _OWNER_RE.search(record.subkey) is not None
                and ServerInfo.from_wire(value) is not None
            )
        if kind == ModelInfo.KIND:
            return is_model_index and has_subkey and ModelInfo.from_wire(value) is not None
        return not is_model_index

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # several instances would only repeat the same checks
        return isinstance(other, BlockswarmRecordValidator)


def make_validators(identity: RSAPrivateKey | None = None) -> tuple[list[RecordValidatorBase], bytes]:
    """Validators to pass to `DHT(record_validators=...)` and the public-key marker to embed in our subkeys.

    `identity` defaults to hivemind's process-wide RSA key.
    """
    signature_validator = RSASignatureValidator(identity)
    return [signature_validator, BlockswarmRecordValidator()], signature_validator.local_public_key
