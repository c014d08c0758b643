"""DHT record validation: signatures (whose record it is) plus our rules (where it may sit, whether it is well formed).

hivemind's CompositeValidator signs in increasing priority and validates/strips in decreasing priority.
RSASignatureValidator has priority 10, BlockswarmRecordValidator keeps 0, so on validation the signature is
checked and stripped first and our validator sees the bare msgpack value.
"""

from __future__ import annotations

from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from .identity import peer_id_from_owner_marker
from .keys import MODEL_INDEX_KEY, parse_index_subkey, parse_report_subkey
from .records import RECORD_TAG, ModelInfo, PeerReport, ServerInfo, content_digest


class BlockswarmRecordValidator(RecordValidatorBase):
    """Rejects records that could hide, forge or corrupt blockswarm's view of the swarm, on every node.

    - Plain values (stored without a subkey) are refused on every key: hivemind replaces a whole dictionary
      with a newer plain value, so one such value would wipe every peer announced on a block key. Every
      hivemind component blockswarm runs (averagers, progress trackers) stores under subkeys.
    - A value tagged `"_bs": "server"` must parse as ServerInfo and sit under a subkey that is exactly an
      "[owner:...]" marker holding an RSA key: RSASignatureValidator then guarantees only that key's holder
      wrote it, and readers take the peer id from the key (identity.py), so nobody can speak for another peer.
    - A value tagged `"_bs": "model"` must parse as ModelInfo and sit in MODEL_INDEX_KEY under the subkey
      "{model}@{its content digest}[owner:...]": an entry can be added but never altered.
    - A value tagged `"_bs": "report"` must parse as PeerReport under the subkey "{peer id}[owner:...]":
      a reporter can publish one report per peer, and never alter another reporter's.
    - MODEL_INDEX_KEY holds nothing else. Other subkeyed values pass untouched (other hivemind components
      share the DHT); so do tags of kinds this version does not know, which newer peers may introduce.
    """

    def __init__(self) -> None:
        self._model_index_id = DHTID.generate(source=MODEL_INDEX_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return False
        is_model_index = record.key == self._model_index_id
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # whatever msgpack raises on garbage
            return not is_model_index
        kind = value.get(RECORD_TAG) if isinstance(value, dict) else None
        if kind == ServerInfo.KIND:
            return (
                not is_model_index
                and peer_id_from_owner_marker(subkey) is not None
                and ServerInfo.from_wire(value) is not None
            )
        if kind == ModelInfo.KIND:
            return is_model_index and _is_model_entry(subkey, value)
        if kind == PeerReport.KIND:
            return (
                not is_model_index
                and parse_report_subkey(subkey) is not None
                and PeerReport.from_wire(value) is not None
            )
        return not is_model_index

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # several instances would only repeat the same checks
        return isinstance(other, BlockswarmRecordValidator)


def _is_model_entry(subkey: Any, value: dict[str, Any]) -> bool:
    parsed = parse_index_subkey(subkey)
    return (
        parsed is not None
        and ModelInfo.from_wire(value) is not None
        and parsed.digest == content_digest(value)
        and peer_id_from_owner_marker(parsed.owner_marker) is not None
    )


def make_validators(identity: RSAPrivateKey | None = None) -> tuple[list[RecordValidatorBase], bytes]:
    """Validators to pass to `DHT(record_validators=...)` and the public-key marker to embed in our subkeys.

    `identity` is the key records are signed with: a listening node's libp2p identity key (see identity.py);
    it defaults to hivemind's process-wide RSA key, for nodes that write no blockswarm records.
    """
    signature_validator = RSASignatureValidator(identity)
    return [signature_validator, BlockswarmRecordValidator()], signature_validator.local_public_key
