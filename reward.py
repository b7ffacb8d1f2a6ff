"""
reward.py: exact-match rewards for math answers, the signal EDGE-GRPO trains on.

The authors' reward (../shared/PAPER.md, "Rewards") is the sum of two parts:
    format   = 1 if a \\boxed{...} answer can be extracted from the response, else 0
    accuracy = 1 if that answer matches the reference answer, else 0
so r_i in {0, 1, 2}: 2 = correct, 1 = boxed but wrong, 0 = no boxed answer. Guided error
correction rewrites every response below MAX_REWARD.

Departures from the authors' code, on purpose:
- Their format reward tests the truthiness of a dict that is never empty, so it is always 1 and
  their rewards are in fact 1 or 2. We implement the format reward they meant.
- Their grader falls back to sympy and math_verify. We compare normalized strings only, by the
  user's design: model output is never passed to eval or sympy. normalize_answer() lists every
  rule; forms it does not unify (2/4 vs 1/2, 0.5 vs \\frac{1}{2}, reordered lists) count as wrong.

Every function here is a pure function over text, linear in its input, and never raises on any
string: a 1 MB completion or 10,000 nested braces are scored in milliseconds.

Try it:  python reward.py "so the answer is \\boxed{\\dfrac{1}{2}}." "$\\frac12$"
"""

import re
import sys
from decimal import Decimal, InvalidOperation

FORMAT_REWARD = 1.0    # a \boxed{} answer was found
ACCURACY_REWARD = 1.0  # and it matches the reference
MAX_REWARD = FORMAT_REWARD + ACCURACY_REWARD  # 2.0: GEC rewrites every response scoring below this

# -----------------------------------------------------------------------------
# Extracting the final answer

# \boxed or \fbox, but not a longer command name that starts with one of them (\boxedeq)
BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
UNBRACED_BOX_ARGUMENT = re.compile(r"[^\s$]+")  # `\boxed 5`: up to the next space or end of math


def _last_box_start(text):
    """Index just past the last box command, or -1. One linear regex pass."""
    last = -1
    for m in BOX_COMMAND.finditer(text):
        last = m.end()
    return last


def _braced_content(text, i):
    """Content of the brace group opening at text[i] == '{', or None if it never closes.
    Escaped braces (\\{ \\}) are content, not structure; one left-to-right pass, so linear time."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # skip the escaped character, whatever it is
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def extract_boxed(text):
    """The content of the LAST \\boxed{...} / \\fbox{...} / `\\boxed 5` in text, or None when there is
    none, it is unbalanced (a truncated response), or it is empty (an empty box holds no answer)."""
    if not isinstance(text, str):
        return None
    i = _last_box_start(text)
    if i < 0:
        return None
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced_content(text, i)
    else:
        m = UNBRACED_BOX_ARGUMENT.match(text, i)
        content = m.group(0) if m else None
    if content is None or not content.strip():
        return None
    return content.strip()


# -----------------------------------------------------------------------------
# Normalizing an answer: each rule below is one named step, applied in order.

MATH_DELIMITERS = re.compile(r"^\s*(\$\$?|\\\(|\\\[)(.*?)(\$\$?|\\\)|\\\])\s*$", re.DOTALL)
# Literal substitutions: layout-only LaTeX, fraction styles, unicode look-alikes.
REPLACEMENTS = (
    ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
    ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("\\quad", ""), ("~", ""),
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""),
    ("{,}", ","),  # 1{,}000
    ("\u2212", "-"), ("\u03c0", "\\pi"), ("\u221e", "\\infty"), ("\u00b0", "^\\circ"),
)
DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
# A number (or a closed group such as 10^{16}) followed by a \text{...} or \mathrm{...} unit with an
# optional exponent: 5\text{ cm}^{-3}
TEXT_UNIT = re.compile(r"^(.*[\d}])\s*\\(?:text|mathrm|mbox)\{[^{}]*\}(?:\^\{?-?\d+\}?)?$", re.DOTALL)
# Unit words after a number. Only words of two letters or more: a single letter is too often a
# variable ("3 n"), so single-letter units count only inside \text{} (TEXT_UNIT).
UNIT_WORDS = (
    "units?|square|sq|cubic|cm|mm|km|kg|mg|ml|mL|meters?|metres?|inch|inches|in|feet|foot|ft|yards?|"
    "miles?|mph|kph|seconds?|sec|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|degrees?|"
    "deg|radians?|rad|dollars?|cents?|percent|liters?|litres?|grams?|kilograms?|people|students|"
    "ways|eV|keV|MeV|kpc|pc|Angstroms?|nm|Hz|kHz|MHz|GHz|per"
)
TRAILING_UNITS = re.compile(r"^(.*[\d}])(?:\s+(?:" + UNIT_WORDS + r")(?:\^\{?-?\d+\}?)?)+\s*$", re.DOTALL)
TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|boldsymbol)\{([^{}]*)\}")
WHITESPACE = re.compile(r"\s+")
# A leading single variable or function assignment: x=, x_1=, f(x)=. Not when '=' appears again.
ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?=(?=[^=]*$)")
THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
SLASH_FRACTION = re.compile(r"^(-?)(\d+)/(\d+)$")
FRAC_NEGATIVE_NUMERATOR = re.compile(r"^\\frac\{-([^{}]*)\}")
# Brace-less LaTeX arguments: \frac12, \frac1{x}, \frac{x}2, \sqrt2, 10^9, x_1
FRAC_TWO_TOKENS = re.compile(r"\\frac(\w)(\w)")
FRAC_FIRST_TOKEN = re.compile(r"\\frac(\w)\{")
FRAC_SECOND_TOKEN = re.compile(r"\\frac\{([^{}]*)\}(\w)")
SQRT_TOKEN = re.compile(r"\\sqrt(\w)")
SCRIPT_TOKEN = re.compile(r"([\^_])(-?\d+|[A-Za-z]|\\[A-Za-z]+)")  # 10^16, 2^n, e^\pi
SCIENTIFIC_E = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d+)$")
NUMBER = re.compile(r"(?<![\w.])(?:\d+\.\d*|\.\d+|\d+)(?![\w.])")
LONGEST_NUMBER = 100  # digits; longer runs are compared as written (Decimal on megabytes is slow)
# No final answer is this long; beyond it we only strip whitespace, which keeps every rule's regex
# work bounded on hostile input (a 1 MB box of unit words would otherwise backtrack quadratically).
LONGEST_ANSWER = 1000  # characters


def _canonical_number(m):
    """'05' -> '5', '5.0' -> '5', '.5' -> '0.5', '0.10' -> '0.1': one spelling per decimal value."""
    token = m.group(0)
    if len(token) > LONGEST_NUMBER:
        return token
    try:
        d = Decimal(token)
    except InvalidOperation:
        return token
    text = format(d.normalize(), "f")
    return text if text != "-0" else "0"


def normalize_answer(s):
    """The canonical form exact match compares. Rules, in order:
    1. str() of numbers (AMC references are floats: 142.0); surrounding $...$, \\(...\\), \\[...\\]
    2. layout-only LaTeX: \\left \\right \\displaystyle \\! \\, \\; \\: \\quad ~; \\% % \\$ $
       \\dfrac and \\tfrac -> \\frac; 1{,}000 -> 1,000; unicode minus, pi, infinity, degree sign
    3. degrees: ^\\circ, ^{\\circ}
    4. units: a trailing \\text{...}/\\mathrm{...} after a number (with exponent), then trailing unit
       words of two letters or more after a number ("10 square units", "5 cm")
    5. \\text{X}, \\mathrm{X}, \\mathbf{X} ... -> X ("\\text{Evelyn}" -> "Evelyn")
    6. all whitespace and a trailing '.' removed; one pair of braces around the whole answer dropped;
       then a leading assignment x=, x_1=, f(x)= dropped ({a_n=2^{n-1}} -> 2^{n-1})
    7. thousands separators in numbers (1,000 -> 1000); a leading '+' on a number dropped
    8. a/b of integers -> \\frac{a}{b}; \\frac{-a}{b} -> -\\frac{a}{b}; 3e5 and 3\\cdot10^5 -> 3\\times10^{5}
    9. brace-less arguments get braces: \\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}, 10^9 -> 10^{9},
       2^n -> 2^{n}
    10. every decimal number in its canonical spelling: 05 -> 5, 5.0 -> 5, .5 -> 0.5
    Case is kept: C and c are different answers. An answer over LONGEST_ANSWER characters is only
    stripped of whitespace."""
    s = str(s).strip()
    if len(s) > LONGEST_ANSWER:
        return WHITESPACE.sub("", s)
    m = MATH_DELIMITERS.match(s)
    if m:
        s = m.group(2)
    for old, new in REPLACEMENTS:
        s = s.replace(old, new)
    s = DEGREES.sub("", s)
    s = TEXT_UNIT.sub(r"\1", s)
    s = TRAILING_UNITS.sub(r"\1", s)
    s = TEXT_WRAPPER.sub(r"\1", s)
    s = WHITESPACE.sub("", s).rstrip(".")
    if s.startswith("{") and _braced_content(s, 0) == s[1:-1]:
        s = s[1:-1]
    s = ASSIGNMENT.sub("", s)
    if THOUSANDS.match(s):
        s = s.replace(",", "")
    if s.startswith("+") and s[1:2].isdigit():
        s = s[1:]
    s = SLASH_FRACTION.sub(r"\1\\frac{\2}{\3}", s)
    s = FRAC_NEGATIVE_NUMERATOR.sub(r"-\\frac{\1}", s)
    s = SCIENTIFIC_E.sub(r"\1\\times10^{\2}", s).replace("\\cdot10^", "\\times10^")
    s = FRAC_TWO_TOKENS.sub(r"\\frac{\1}{\2}", s)
    s = FRAC_FIRST_TOKEN.sub(r"\\frac{\1}{", s)
    s = FRAC_SECOND_TOKEN.sub(r"\\frac{\1}{\2}", s)
    s = SQRT_TOKEN.sub(r"\\sqrt{\1}", s)
    s = SCRIPT_TOKEN.sub(r"\1{\2}", s)
    s = NUMBER.sub(_canonical_number, s)
    return s


# -----------------------------------------------------------------------------
# Rewards


def acceptable_answers(answer):
    """Reference answers come as a string, a number (AMC) or a list of acceptable strings (Minerva)."""
    return list(answer) if isinstance(answer, (list, tuple)) else [answer]


def _unboxed(reference):
    """A few references are themselves boxed ('$\\boxed{a=170}$' in the training set): use the content."""
    return (extract_boxed(reference) if isinstance(reference, str) else None) or reference


def reference_answer_text(answer):
    """The reference as a model would box it: the first acceptable form, unboxed, without $...$.
    Guided error correction writes it into \\boxed{} when it appends the correct answer."""
    first = acceptable_answers(answer)[0] if acceptable_answers(answer) else ""
    if isinstance(first, float) and first.is_integer():  # AMC stores 142.0
        first = int(first)
    text = str(_unboxed(first)).strip()
    m = MATH_DELIMITERS.match(text)
    return (m.group(2) if m else text).strip()


def boxed_answer(completion):
    """The completion's last boxed answer, normalized (None without one): two completions give the
    same answer exactly when these are equal, as is_correct compares them."""
    predicted = extract_boxed(completion)
    return None if predicted is None else normalize_answer(predicted)


def is_correct(completion, answer):
    """True when the completion's last boxed answer equals any acceptable reference, after normalization.
    A reference that is itself boxed is compared by its content."""
    target = boxed_answer(completion)
    if target is None:
        return False
    return any(target == normalize_answer(_unboxed(a)) for a in acceptable_answers(answer) if a is not None)


def format_reward(completion):
    return FORMAT_REWARD if extract_boxed(completion) is not None else 0.0


def accuracy_reward(completion, answer):
    return ACCURACY_REWARD if is_correct(completion, answer) else 0.0


def reward(completion, answer):
    """r_i = format + accuracy: 2.0 correct, 1.0 boxed but wrong, 0.0 no boxed answer."""
    return format_reward(completion) + accuracy_reward(completion, answer)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit('usage: python reward.py "<completion text>" "<reference answer>"')
    completion, answer = sys.argv[1], sys.argv[2]
    predicted = extract_boxed(completion)
    print(f"extracted answer : {predicted!r}")
    print(f"normalized answer: {normalize_answer(predicted)!r}" if predicted is not None else
          "normalized answer: (none: no complete, non-empty \\boxed{} found)")
    print(f"normalized ref   : {normalize_answer(answer)!r}")
    print(f"reward           : {reward(completion, answer)} "
          f"(format {format_reward(completion)} + accuracy {accuracy_reward(completion, answer)})")
