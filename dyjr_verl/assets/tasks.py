"""Embedded verifiable tasks: arithmetic word problems and Text-to-SQL over a generated SQLite DB.

Both are generated deterministically from a seed, offline, in milliseconds, and written in verl's
parquet schema (``data_source``, chat ``prompt``, ``ability``, ``reward_model.ground_truth``,
``extra_info``) so that ``python -m verl.trainer.main_ppo`` reads them like GSM8K or MATH.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dyjr_verl.data.schema import make_row

ARITH_DATA_SOURCE = "dyjr/arithmetic"
SQL_DATA_SOURCE = "dyjr/tiny_sql"

ARITH_INSTRUCTION = "Solve step by step and put the final answer in \\boxed{}."
SQL_INSTRUCTION = "Write one SQLite query that answers the question, inside ```sql ... ```."

_NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Lia", "Max", "Zoe", "Ian", "Kim"]
_ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles"]


@dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    solution: str  # short chain of thought ending in \boxed{answer}
    answer: int


def _two_step(rng: random.Random, name: str, item: str) -> ArithmeticProblem:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 5)
    ops = rng.choice(["++", "+-", "-+"])
    if ops == "++":
        q = f"{name} has {a} {item}, buys {b} more and then {c} more. How many {item} does {name} have?"
        mid, ans = a + b, a + b + c
        sol = f"{a} + {b} = {mid}. {mid} + {c} = {ans}. \\boxed{{{ans}}}"
    elif ops == "+-":
        q = f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} does {name} have?"
        mid, ans = a + b, a + b - c
        sol = f"{a} + {b} = {mid}. {mid} - {c} = {ans}. \\boxed{{{ans}}}"
    else:
        a = max(a, c + 1)
        q = f"{name} has {a} {item}, gives away {c} and then buys {b} more. How many {item} does {name} have?"
        mid, ans = a - c, a - c + b
        sol = f"{a} - {c} = {mid}. {mid} + {b} = {ans}. \\boxed{{{ans}}}"
    return ArithmeticProblem(q, sol, ans)


def _one_step(rng: random.Random, name: str, item: str) -> ArithmeticProblem:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?"
        ans = a + b
        sol = f"{a} + {b} = {ans}. \\boxed{{{ans}}}"
    else:
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have?"
        ans = a - b
        sol = f"{a} - {b} = {ans}. \\boxed{{{ans}}}"
    return ArithmeticProblem(q, sol, ans)


_VERBS = {"+": "buys {x} more", "-": "gives away {x}"}


def _three_step(rng: random.Random, name: str, item: str) -> ArithmeticProblem:
    """Three operations (buy/give away), every intermediate count >= 0; three-line chain of thought."""
    a = rng.randint(2, 9)
    ops = [rng.choice("+-") for _ in range(3)]
    count, steps, clauses = a, [], []
    for op in ops:
        x = rng.randint(1, 9) if op == "+" else rng.randint(1, max(1, min(count, 9)))
        if op == "-" and x > count:  # count is 0: nothing to give away, buy instead
            op = "+"
        new = count + x if op == "+" else count - x
        steps.append(f"{count} {op} {x} = {new}.")
        clauses.append(_VERBS[op].format(x=x))
        count = new
    q = (f"{name} has {a} {item}, {clauses[0]}, {clauses[1]} and then {clauses[2]}. "
         f"How many {item} does {name} have?")
    return ArithmeticProblem(q, " ".join(steps) + f" \\boxed{{{count}}}", count)


def arithmetic_problems(n: int, seed: int, two_step_share: float = 0.5,
                        three_step_share: float = 0.0) -> list[ArithmeticProblem]:
    """``n`` distinct word problems: ``three_step_share`` need three operations, ``two_step_share``
    two, the rest one. With ``three_step_share=0`` the random stream (hence every existing build)
    is exactly what it was before three-step problems existed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[ArithmeticProblem] = []
    while len(out) < n:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        if three_step_share > 0 and rng.random() < three_step_share:
            p = _three_step(rng, name, item)
        else:
            p = _two_step(rng, name, item) if rng.random() < two_step_share else _one_step(rng, name, item)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def arithmetic_rows(problems: list[ArithmeticProblem], split: str) -> list[dict]:
    return [
        make_row(data_source=ARITH_DATA_SOURCE, prompt=f"{p.question} {ARITH_INSTRUCTION}", ability="math",
                 ground_truth=str(p.answer), split=split, index=i,
                 extra={"question": p.question, "answer": p.solution})
        for i, p in enumerate(problems)
    ]


# ----------------------------------------------------------------------------------------------
# Text-to-SQL over a generated company database
# ----------------------------------------------------------------------------------------------

_DEPTS = [("Sales", "Paris"), ("Research", "Berlin"), ("Support", "Madrid"), ("Finance", "Paris"), ("Legal", "Rome")]
_FIRST = ["Ada", "Ben", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Ned", "Oz"]

SQL_SCHEMA = """
CREATE TABLE department (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
CREATE TABLE employee (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, age INTEGER NOT NULL, salary INTEGER NOT NULL,
    department_id INTEGER NOT NULL REFERENCES department(id)
);
"""


def build_company_db(path: Path, seed: int) -> None:
    """Write the tiny company SQLite database (replaced if present)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    try:
        con.executescript(SQL_SCHEMA)
        con.executemany("INSERT INTO department VALUES (?, ?, ?)", [(i + 1, n, c) for i, (n, c) in enumerate(_DEPTS)])
        employees = [
            (i + 1, name, rng.randint(22, 60), 1000 * rng.randint(30, 90), rng.randint(1, len(_DEPTS)))
            for i, name in enumerate(_FIRST)
        ]
        con.executemany("INSERT INTO employee VALUES (?, ?, ?, ?, ?)", employees)
        con.commit()
    finally:
        con.close()


def sql_questions(seed: int) -> list[tuple[str, str]]:
    """(question, gold SQL) pairs from templates over the company schema, in a seeded order."""
    qs: list[tuple[str, str]] = []
    for dept, city in _DEPTS:
        qs.append((f"How many employees work in the {dept} department?",
                   f"SELECT COUNT(*) FROM employee JOIN department ON employee.department_id = department.id "
                   f"WHERE department.name = '{dept}'"))
        qs.append((f"List the names of employees in the {dept} department.",
                   f"SELECT employee.name FROM employee JOIN department ON employee.department_id = department.id "
                   f"WHERE department.name = '{dept}'"))
        qs.append((f"What is the average salary in the {dept} department?",
                   f"SELECT AVG(salary) FROM employee JOIN department ON employee.department_id = department.id "
                   f"WHERE department.name = '{dept}'"))
    for age in (30, 40, 50):
        qs.append((f"How many employees are older than {age}?", f"SELECT COUNT(*) FROM employee WHERE age > {age}"))
        qs.append((f"List the names of employees younger than {age}.", f"SELECT name FROM employee WHERE age < {age}"))
    for city in sorted({c for _, c in _DEPTS}):
        qs.append((f"Which departments are in {city}?", f"SELECT name FROM department WHERE city = '{city}'"))
    qs.append(("What is the highest salary?", "SELECT MAX(salary) FROM employee"))
    qs.append(("What is the lowest salary?", "SELECT MIN(salary) FROM employee"))
    qs.append(("How many departments are there?", "SELECT COUNT(*) FROM department"))
    qs.append(("How many employees are there?", "SELECT COUNT(*) FROM employee"))
    qs.append(("List all employee names ordered by salary from highest to lowest.",
               "SELECT name FROM employee ORDER BY salary DESC"))
    random.Random(seed).shuffle(qs)
    return qs


def sql_question_pool(seed: int) -> list[tuple[str, str]]:
    """The default questions plus parameterised templates (age and salary thresholds, department x
    threshold): a few hundred distinct (question, gold SQL) pairs in a seeded order, enough for
    train / validation / held-out splits that share templates but not values (the SQL warm start).
    The default :func:`sql_questions` (and every existing build) is unchanged."""
    join = "FROM employee JOIN department ON employee.department_id = department.id"
    qs = sql_questions(seed)
    ages, salaries = range(23, 60), range(35000, 90000, 5000)
    for age in ages:
        qs.append((f"How many employees are older than {age}?", f"SELECT COUNT(*) FROM employee WHERE age > {age}"))
        qs.append((f"List the names of employees younger than {age}.", f"SELECT name FROM employee WHERE age < {age}"))
    for pay in salaries:
        qs.append((f"How many employees earn more than {pay}?", f"SELECT COUNT(*) FROM employee WHERE salary > {pay}"))
        qs.append((f"List the names of employees who earn less than {pay}.",
                   f"SELECT name FROM employee WHERE salary < {pay}"))
    for dept, _ in _DEPTS:
        where = f"WHERE department.name = '{dept}'"
        qs.append((f"What is the average age in the {dept} department?", f"SELECT AVG(age) {join} {where}"))
        qs.append((f"What is the highest salary in the {dept} department?", f"SELECT MAX(salary) {join} {where}"))
        for age in ages:
            qs.append((f"How many employees in the {dept} department are older than {age}?",
                       f"SELECT COUNT(*) {join} {where} AND employee.age > {age}"))
        for pay in salaries:
            qs.append((f"List the names of employees in the {dept} department who earn more than {pay}.",
                       f"SELECT employee.name {join} {where} AND employee.salary > {pay}"))
    seen: set[str] = set()
    pool = [(q, g) for q, g in qs if not (q in seen or seen.add(q))]
    random.Random(seed + 1).shuffle(pool)
    return pool


def sql_solution(gold: str) -> str:
    """The supervised target for a question: the gold query in the fence the reward extracts."""
    return f"```sql\n{gold}\n```"


def sql_rows(pairs: list[tuple[str, str]], db_path: Path, split: str) -> list[dict]:
    schema = " ".join(SQL_SCHEMA.split())
    return [
        make_row(data_source=SQL_DATA_SOURCE, prompt=f"Schema: {schema}\nQuestion: {q}\n{SQL_INSTRUCTION}",
                 ability="sql", ground_truth=gold, split=split, index=i,
                 extra={"question": q, "db_path": str(db_path), "db_id": "company"})
        for i, (q, gold) in enumerate(pairs)
    ]
