"""The trusted programs that the code reward runs inside its sandbox, as source text.

- ``UNIT_HARNESS``: the test process of a unit-test record. It receives the job (program,
  prompt, tests, entry point, nonce) on stdin, starts the program's process (``SERVER``) and
  runs the prompt and the tests with ``candidate`` standing for the entry point, which it calls
  in the program's process over two pipes. What the call needs crosses in both directions as
  pickles: arguments go over; the result comes back as plain data only (builtin types and a
  few standard value types, ``PLAIN``), with the arguments as they are after the call (copied
  back in place, so an in-place sort is seen), functions passed as arguments called back in
  the test process, returned iterators and functions left in the program's process and driven
  from the test process through proxies, and an exception re-raised as the same builtin (or
  prompt-defined) exception type. It prints the nonce after the tests return, only if they
  called the candidate at least once.
- ``SERVER``: the program's process: runs the program, then serves those requests.
- ``STDIO_HARNESS``: the runner of a stdin/stdout record: each input to a fresh run of the
  program, whose output (a file, so ``file_mb`` bounds it) is reported as a digest of its
  ``normalize_output`` text.

Both harnesses make themselves non-dumpable, so the program cannot read their memory,
environment or descriptors through /proc.
"""

from __future__ import annotations

import inspect


def normalize_output(text: str) -> str:
    """Output as compared: trailing whitespace of each line and trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


# Shared by both processes of a unit-test run: framing, and exceptions across the boundary.
_WIRE = r'''
import builtins, io, pickle, struct

def send(stream, data):
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()

def receive(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    return stream.read(struct.unpack("<Q", head)[0])

def exception_message(exc):
    """(module, name, args) of an exception, its args as plain scalars."""
    args = tuple(a if type(a) in (str, int, float, bool) or a is None else repr(a)[:500]
                 for a in exc.args[:4])
    return type(exc).__module__, type(exc).__qualname__, args

def rebuild_exception(module, name, args, namespace):
    """The same builtin exception type, or one the prompt defines; else a RuntimeError."""
    cls = getattr(builtins, name, None) if module == "builtins" else namespace.get(name)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(*args)
        except Exception:
            pass
    return RuntimeError(f"the candidate raised {module}.{name}{args!r:.300}")
'''

SERVER = _WIRE + r'''
import collections.abc, functools, os, sys, types
path, name = sys.argv[1], sys.argv[2]
calls, replies = os.fdopen(int(sys.argv[3]), "rb"), os.fdopen(int(sys.argv[4]), "wb")
namespace = {"__name__": "solution", "__file__": path}
with open(path) as f:
    exec(compile(f.read(), path, "exec"), namespace)
entry = namespace.get(name)
if entry is None and isinstance(namespace.get("Solution"), type):
    entry = getattr(namespace["Solution"](), name, None)  # LeetCode style: a method
if not callable(entry):
    sys.exit(f"the program defines no function {name!r}")
remote = {0: entry}  # key -> an object of this process that the test process drives
IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, range)
FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType,
             functools.partial)

class Callback:
    """A function of the test process (passed as an argument): calling it asks that process."""
    def __init__(self, key):
        self.key = key
    def __call__(self, *args, **kwargs):
        reply = request(("callback", self.key, args, kwargs))
        if reply[0] == "return":
            return reply[1]
        raise rebuild_exception(*reply[1:], namespace)

class Dumper(pickle.Pickler):
    """Pickles for the test process: its own callbacks and (optionally) the call's mutable
    arguments by reference; iterators and functions of this process as remote objects."""
    def __init__(self, file, args=()):
        super().__init__(file)
        self.args = {id(a): k for k, a in args if not isinstance(a, IMMUTABLE)}
    def persistent_id(self, obj):
        if isinstance(obj, Callback):
            return ("fn", obj.key)
        if id(obj) in self.args:
            return ("arg", self.args[id(obj)])
        if isinstance(obj, collections.abc.Iterator) or isinstance(obj, FUNCTIONS):
            remote[len(remote)] = obj
            return ("remote", len(remote) - 1)
        return None

class Loader(pickle.Unpickler):
    def persistent_load(self, pid):
        if pid[0] == "fn":
            return Callback(pid[1])
        return remote[pid[1]]

def dumps(obj, args=()):
    buf = io.BytesIO()
    Dumper(buf, args).dump(obj)
    return buf.getvalue()

def request(message):
    """Send ``message``; serve the test process's requests until its reply comes."""
    send(replies, dumps(message))
    while (data := receive(calls)) is not None:
        message = Loader(io.BytesIO(data)).load()
        if message[0] in ("return", "raise"):
            return message
        serve(message)
    sys.exit(0)

def serve(message):
    kind, key = message[0], message[1]
    try:
        if kind == "call":
            args, kwargs = message[2], message[3]
            result = remote[key](*args, **kwargs)
            named = list(enumerate(args)) + list(kwargs.items())
            send(replies, dumps(("ok", dumps(result, named), dumps((args, kwargs)))))
            return
        items, done = [], False
        for _ in range(message[2]):
            try:
                items.append(next(remote[key]))
            except StopIteration:
                done = True
                break
        send(replies, dumps(("items", dumps(items), done)))
    except Exception as exc:  # the program's, or a result that cannot be pickled
        send(replies, dumps(("error", *exception_message(exc))))

while (data := receive(calls)) is not None:
    serve(Loader(io.BytesIO(data)).load())
'''

UNIT_HARNESS = _WIRE + r'''
import collections, ctypes, json, os, subprocess, sys, types, functools
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no reading this process via /proc
job = json.loads(sys.stdin.buffer.read())
with open("solution.py", "w") as f:
    f.write(job["program"])
call_r, call_w = os.pipe()
reply_r, reply_w = os.pipe()
subprocess.Popen([sys.executable, "-I", "-c", job["server"], "solution.py", job["entry_point"],
                  str(call_r), str(reply_w)], stdin=subprocess.DEVNULL, stdout=2,
                 pass_fds=(call_r, reply_w))
os.close(call_r)
os.close(reply_w)
calls, replies = os.fdopen(call_w, "wb"), os.fdopen(reply_r, "rb")
PLAIN = {("builtins", n) for n in ("complex", "set", "frozenset", "bytearray", "range", "slice",
                                   "int", "float", "str", "bytes", "list", "dict", "tuple",
                                   "bool")}
PLAIN |= {("collections", n) for n in ("OrderedDict", "Counter", "deque", "defaultdict")}
PLAIN |= {("fractions", "Fraction"), ("decimal", "Decimal")}
PLAIN |= {("datetime", n) for n in ("date", "time", "datetime", "timedelta", "timezone")}
FUNCTIONS = (types.FunctionType, types.MethodType, functools.partial)
callbacks = []  # functions of the tests passed to the candidate, by key
namespace = {"__name__": "tests"}
calls_made = 0

class Remote:
    """An iterator or function that stays in the program's process."""
    def __init__(self, key):
        self.key, self.batch, self.buffer, self.done = key, 1, [], False
    def __call__(self, *args, **kwargs):
        return call(self.key, args, kwargs)
    def __iter__(self):
        return self
    def __next__(self):
        if not self.buffer and not self.done:
            items, self.done = expect(request(("next", self.key, self.batch)), "items")
            self.buffer = list(reversed(PlainData.loads(items)))
            self.batch = min(self.batch * 2, 1024)  # lazy at first, then in batches
        if not self.buffer:
            raise StopIteration
        return self.buffer.pop()

class PlainData(pickle.Unpickler):
    """Only plain data from the program's process, and references to what it may name."""
    args = ()
    @classmethod
    def loads(cls, data, args=()):
        loader = cls(io.BytesIO(data))
        loader.args = dict(args)
        return loader.load()
    def find_class(self, module, name):
        if (module, name) in PLAIN:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the candidate returned a {module}.{name}, not plain data")
    def persistent_load(self, pid):
        if type(pid) is tuple and len(pid) == 2 and type(pid[1]) in (int, str):
            if pid[0] == "fn" and type(pid[1]) is int and 0 <= pid[1] < len(callbacks):
                return callbacks[pid[1]]
            if pid[0] == "arg" and pid[1] in self.args:
                return self.args[pid[1]]
            if pid[0] == "remote" and type(pid[1]) is int:
                return Remote(pid[1])
        raise pickle.UnpicklingError(f"a bad reference from the candidate: {pid!r:.100}")

class Dumper(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Remote):
            return ("remote", obj.key)
        if isinstance(obj, FUNCTIONS):
            callbacks.append(obj)
            return ("fn", len(callbacks) - 1)
        return None

def dumps(obj):
    buf = io.BytesIO()
    Dumper(buf).dump(obj)
    return buf.getvalue()

def request(message):
    """Send ``message``; run the program's callbacks until its reply comes."""
    send(calls, dumps(message))
    while (data := receive(replies)) is not None:
        reply = PlainData.loads(data)
        if type(reply) is not tuple or not reply or reply[0] != "callback":
            return reply
        try:
            _, key, args, kwargs = reply
            out = ("return", callbacks[key](*args, **kwargs))
        except Exception as exc:
            out = ("raise", *exception_message(exc))
        send(calls, dumps(out))
    raise RuntimeError("the candidate's process ended")

def sync(old, new):
    """Make ``old`` (an argument) equal ``new`` (it after the call) in place, where it is a
    mutable container; False where it cannot be (then the caller replaces it)."""
    if type(old) is not type(new):
        return False
    if isinstance(old, list):
        if len(old) != len(new):
            old[:] = new
        for i, item in enumerate(new):
            if not sync(old[i], item):
                old[i] = item
        return True
    if isinstance(old, dict):
        for key in [k for k in old if k not in new]:
            del old[key]
        for key, value in new.items():
            if key not in old or not sync(old[key], value):
                old[key] = value
        return True
    if isinstance(old, (set, collections.deque)):
        old.clear()
        (old.update if isinstance(old, set) else old.extend)(new)
        return True
    if isinstance(old, bytearray):
        old[:] = new
        return True
    if isinstance(old, tuple) and len(old) == len(new):
        return all(sync(a, b) or a == b for a, b in zip(old, new))
    return False

def expect(reply, kind):
    """The two fields of a reply of ``kind``; an "error" reply raises its exception."""
    if type(reply) is tuple and len(reply) == 3 and reply[0] == kind:
        return reply[1:]
    if type(reply) is tuple and len(reply) == 4 and reply[0] == "error":
        raise rebuild_exception(*reply[1:], namespace)
    raise RuntimeError(f"the candidate failed: {reply!r:.300}")

def call(key, args, kwargs):
    global calls_made
    calls_made += 1
    result, after = expect(request(("call", key, args, kwargs)), "ok")
    named = dict(enumerate(args)) | kwargs
    new = PlainData.loads(after)
    if not (type(new) is tuple and len(new) == 2 and type(new[0]) is tuple
            and type(new[1]) is dict):
        raise RuntimeError("the candidate's process sent bad arguments back")
    for name, value in list(enumerate(new[0])) + list(new[1].items()):
        if name in named:
            sync(named[name], value)
    return PlainData.loads(result, named.items())

def candidate(*args, **kwargs):
    return call(0, args, kwargs)

try:
    prompt = compile(job["prompt"], "prompt", "exec")
except SyntaxError:
    prompt = None  # a prompt in prose: no helpers to take from it
if prompt is not None:
    exec(prompt, namespace)
namespace[job["entry_point"]] = candidate
namespace.update(job.get("globals", {}))
exec(compile(job["test"], "test", "exec"), namespace)
if callable(namespace.get("check")):
    namespace["check"](candidate)
if calls_made:
    print(job["nonce"], flush=True)
else:
    print("the tests never called the candidate", file=sys.stderr)
'''

STDIO_HARNESS = "import hashlib\n" + inspect.getsource(normalize_output) + r'''
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no reading this process via /proc
job = json.loads(sys.stdin.buffer.read())
with open("solution.py", "w") as f:
    f.write(job["program"])
for case, text in enumerate(job["inputs"]):
    with open("output.txt", "w+b") as out:
        os.unlink("output.txt")
        proc = subprocess.Popen([sys.executable, "-I", "solution.py"], stdin=subprocess.PIPE,
                                stdout=out, stderr=2, start_new_session=True)
        try:
            proc.communicate(text.encode(), timeout=job["timeout_s"])
            status = proc.returncode
        except subprocess.TimeoutExpired:
            status = None
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        out.seek(0)
        output = normalize_output(out.read().decode(errors="replace"))
    digest = hashlib.sha256(output.encode()).hexdigest()
    print(json.dumps({"nonce": job["nonce"], "case": case, "status": status, "digest": digest}),
          flush=True)
'''
