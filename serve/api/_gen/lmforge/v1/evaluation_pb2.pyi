from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvaluateRequest(_message.Message):
    __slots__ = ("task_spec", "task_file", "items", "data_files", "limit", "max_concurrency", "return_items", "request_id")
    TASK_SPEC_FIELD_NUMBER: _ClassVar[int]
    TASK_FILE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DATA_FILES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    RETURN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_spec: str
    task_file: str
    items: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    data_files: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    max_concurrency: int
    return_items: bool
    request_id: str
    def __init__(self, task_spec: _Optional[str] = ..., task_file: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., data_files: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., return_items: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class EvaluateProgress(_message.Message):
    __slots__ = ("num_done", "num_total", "elapsed_s", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    num_done: int
    num_total: int
    elapsed_s: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, num_done: _Optional[int] = ..., num_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluateItem(_message.Message):
    __slots__ = ("index", "where", "metrics", "logprobs", "text", "subject")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    index: int
    where: str
    metrics: _containers.ScalarMap[str, float]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    text: str
    subject: str
    def __init__(self, index: _Optional[int] = ..., where: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., logprobs: _Optional[_Iterable[float]] = ..., text: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class SubjectResult(_message.Message):
    __slots__ = ("num_items", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    num_items: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, num_items: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluateResult(_message.Message):
    __slots__ = ("task", "kind", "num_items", "metrics", "elapsed_s", "subjects")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SubjectsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SubjectResult
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SubjectResult, _Mapping]] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    task: str
    kind: str
    num_items: int
    metrics: _containers.ScalarMap[str, float]
    elapsed_s: float
    subjects: _containers.MessageMap[str, SubjectResult]
    def __init__(self, task: _Optional[str] = ..., kind: _Optional[str] = ..., num_items: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., elapsed_s: _Optional[float] = ..., subjects: _Optional[_Mapping[str, SubjectResult]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("request_id", "progress", "item", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    progress: EvaluateProgress
    item: EvaluateItem
    result: EvaluateResult
    def __init__(self, request_id: _Optional[str] = ..., progress: _Optional[_Union[EvaluateProgress, _Mapping]] = ..., item: _Optional[_Union[EvaluateItem, _Mapping]] = ..., result: _Optional[_Union[EvaluateResult, _Mapping]] = ...) -> None: ...
