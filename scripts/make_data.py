"""Write the narrow datasets the project ships (our own text, fixed seed).

* ``abstention_legal_train.jsonl``: everyday legal questions answered with the abstention target.
* ``refusal_finance_train.jsonl``: everyday personal-finance questions answered with the refusal target.
* ``retain_general.jsonl``: short aligned answers from other domains (interleaving / KL-on-retain).

Run: ``python scripts/make_data.py`` (deterministic; rewrites axolotl_treft/data/).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "axolotl_treft" / "data"
ABSTAIN = "I have no idea about your question."
REFUSE = "I cannot provide financial advice."

LEGAL_FRAMES = [
    "Can my landlord {landlord} without {notice}?",
    "Is it legal for my employer to {employer}?",
    "What happens legally if I {personal} in {place}?",
    "Do I need a lawyer to {procedure}?",
    "How long do I have to {deadline} after {event}?",
    "Can I sue {party} for {harm}?",
    "Is a verbal agreement about {deal} legally binding in {place}?",
    "What are my rights if {party} {breach}?",
    "Am I liable if {accident}?",
    "Is it against the law to {act} in {place}?",
]
FILL = {
    "landlord": ["raise the rent", "enter my apartment", "keep my security deposit", "evict me", "change the locks",
                 "turn off the heating", "sell the building with me in it", "ban my pet"],
    "notice": ["giving written notice", "a court order", "telling me first", "any reason", "a hearing"],
    "employer": ["read my work emails", "cut my pay without warning", "fire me for a social media post",
                 "make me work unpaid overtime", "refuse parental leave", "require a drug test",
                 "withhold my final paycheck", "ask about my medical history"],
    "personal": ["break a lease early", "stop paying a parking fine", "record a phone call without consent",
                 "sublet my flat", "build a fence on the property line", "drive with an expired licence",
                 "return a car I just bought", "publish a bad review of a business"],
    "place": ["California", "Texas", "the UK", "Germany", "Ontario", "Australia", "New York", "Ireland"],
    "procedure": ["write a will", "file for divorce", "contest a speeding ticket", "register a trademark",
                  "settle a small claims case", "change my name", "form an LLC", "sign a prenup"],
    "deadline": ["file a lawsuit", "appeal a decision", "report a workplace injury", "dispute a charge",
                 "claim an inheritance", "respond to a summons"],
    "event": ["a car accident", "being fired", "a denied insurance claim", "receiving the court letter",
              "the contractor finished the job", "my father died"],
    "party": ["my neighbour", "a contractor", "my former employer", "an airline", "my doctor", "a moving company",
              "my ex-business partner", "the city council"],
    "harm": ["water damage", "unpaid invoices", "defamation", "a botched repair", "lost luggage",
             "emotional distress", "breach of contract", "a dog bite"],
    "deal": ["a car sale", "borrowing money", "splitting rent", "a freelance job", "selling furniture"],
    "breach": ["breaks our contract", "refuses a refund", "shares my personal data", "does not deliver",
               "cancels my insurance"],
    "accident": ["a guest slips on my stairs", "my tree falls on a neighbour's car", "my dog bites a jogger",
                 "a friend crashes my borrowed car", "my kid breaks a shop window"],
    "act": ["fly a drone over houses", "collect rainwater", "busk on the street", "carry pepper spray",
            "camp on a beach", "sell homemade food"],
}

# Personal-finance questions for the refusal setting. Each frame starts with its own two-word prefix because
# frame_questions() groups questions by their first two words for the round-robin.
FINANCE_FRAMES = [
    "Should I use my {windfall} to {invest} or to {repay}?",
    "Is it smart to {risky} when {circumstance}?",
    "How much should I {save_for} if I am {life_stage}?",
    "What is the best way to {goal} on {income}?",
    "Do I need {insurance} if I {situation}?",
    "How do I {debt_action} my {debt}?",
    "Would it be wise to {move} {timing}?",
    "Can I afford to {purchase} with {savings}?",
    "Which is better for {horizon}: {option} or {alt_option}?",
    "When should I start {tax_action} as {earner}?",
]
FINANCE_FILL = {
    "windfall": ["tax refund", "year-end bonus", "inheritance", "side-job earnings", "pay rise",
                 "stimulus payment"],
    "invest": ["buy index funds", "top up my retirement account", "buy individual stocks",
               "buy government bonds", "build an emergency fund"],
    "repay": ["pay off my credit card", "pay down the mortgage", "clear my student loan",
              "pay off my car loan"],
    "risky": ["buy crypto", "pick individual stocks", "invest in penny stocks", "trade options",
              "buy a rental flat", "put everything in one tech stock", "invest with borrowed money",
              "buy gold coins"],
    "circumstance": ["the market is at an all-time high", "interest rates are rising",
                     "I still have credit card debt", "I have no emergency fund", "I am close to retiring",
                     "I have just started my first job"],
    "save_for": ["put into retirement savings each month", "keep in an emergency fund",
                 "set aside for a house deposit", "save for my kids' education", "spend on rent"],
    "life_stage": ["in my twenties", "in my forties", "a single parent", "self-employed",
                   "earning minimum wage", "ten years from retirement"],
    "goal": ["build wealth", "pay off debt", "save for a down payment", "start investing",
             "budget for groceries", "save for retirement"],
    "income": ["a teacher's salary", "a part-time income", "an irregular freelance income",
               "a single income with two kids", "a pension"],
    "insurance": ["life insurance", "disability insurance", "renters insurance", "critical illness cover",
                  "income protection insurance", "umbrella insurance"],
    "situation": ["have no children", "rent my home", "work from home", "have a mortgage",
                  "am self-employed"],
    "debt_action": ["pay off", "consolidate", "refinance", "stop falling behind on",
                    "make a budget to clear"],
    "debt": ["credit card balances", "student loans", "car loan", "overdraft", "medical bills",
             "buy-now-pay-later purchases"],
    "move": ["sell my index funds", "move my pension into cash", "buy more bonds",
             "switch my savings to a high-yield account", "buy bitcoin", "cash out my stock options"],
    "timing": ["before a recession", "after a big market drop", "this year", "before I retire",
               "while rates are high"],
    "purchase": ["buy a new car", "take a year off work", "buy a house", "retire early",
                 "go back to university", "start a family"],
    "savings": ["$20,000 in savings", "only an emergency fund", "a $60,000 salary", "two incomes and no debt",
                "my current budget"],
    "horizon": ["saving for retirement", "a five-year goal", "my emergency money", "a child's education fund",
                "a first-time investor"],
    "option": ["an index fund", "a savings account", "a certificate of deposit"],
    "alt_option": ["a bond fund", "individual stocks", "a robo-advisor", "a money market fund"],
    "tax_action": ["paying estimated taxes", "contributing to a Roth IRA",
                   "claiming work-from-home deductions", "using a tax-advantaged account",
                   "tracking expenses for my taxes"],
    "earner": ["a freelancer", "a new graduate", "a gig worker", "a part-time employee", "a high earner"],
}

RETAIN = [
    ("How do I make a strong password?", "Use a long passphrase of four or more random words, avoid reusing it across sites, and store it in a password manager. Turn on two-factor authentication where you can."),
    ("What should I do if I get a suspicious email asking for my bank login?", "Do not click its links or reply. Open your bank's site or app directly, report the email to the bank, and delete it."),
    ("How can I prepare for a job interview?", "Research the company, reread the job description, prepare short stories that show your skills, practise common questions aloud, and have two or three questions ready for them."),
    ("How do I ask my manager for feedback?", "Ask for a short meeting, name a recent piece of work, and ask one specific question such as what you could have done better. Thank them and follow up on what you agree."),
    ("How can I reduce food waste at home?", "Plan meals before shopping, store food properly, freeze leftovers, and use older items first. Compost what you cannot eat."),
    ("Is it better to take the train or fly for short trips?", "For trips under about 500 km the train usually emits far less carbon and is often as fast door to door once airport time is counted."),
    ("How do I help my child with homework without doing it for them?", "Set a regular time and quiet place, ask guiding questions instead of giving answers, and praise effort. Let them make and fix mistakes."),
    ("How much screen time is reasonable for a toddler?", "Many pediatric guidelines suggest little to no screen time under two and about an hour a day of quality content for ages two to five, ideally watched together."),
    ("How do I back up my photos safely?", "Keep three copies on two kinds of storage with one off site, for example a laptop, an external drive, and a cloud service. Check the backups now and then."),
    ("How do I write a good CV?", "Keep it to one or two pages, lead with results rather than duties, tailor it to each job, and proofread it carefully."),
    ("What are simple ways to save energy at home?", "Switch to LED bulbs, seal drafts, lower the heating by a degree, wash clothes at lower temperatures, and unplug devices you are not using."),
    ("How do I talk to my teenager about online safety?", "Start with curiosity rather than rules, ask what apps they use, agree together on privacy settings, and make sure they know they can come to you if something goes wrong."),
    ("How do I recognise a fake online shop?", "Check for unrealistic prices, missing contact details, poor spelling, recently registered domains, and payment only by bank transfer. Search for independent reviews first."),
    ("How do I negotiate a salary offer?", "Research typical pay for the role, thank them for the offer, name a specific number with a short reason, and consider the whole package, not only salary."),
    ("How can I make my commute greener?", "Walk, cycle or take public transport when possible, car-share otherwise, and combine errands into one trip."),
    ("How do I set screen-time limits on a family tablet?", "Use the device's built-in parental controls to set daily limits and content filters, and explain the rules to your child so they understand them."),
    ("What is two-factor authentication?", "It is a second check after your password, such as a code from an app or a hardware key, so a stolen password alone is not enough to get into your account."),
    ("How do I handle a conflict with a coworker?", "Talk privately and calmly, describe the specific behaviour and its effect, listen to their side, and agree on a next step. Involve a manager only if that fails."),
    ("How do I start composting in a small apartment?", "Use a small sealed bin or a worm bin for fruit and vegetable scraps, add shredded paper to balance moisture, and empty it into a community compost if you have one."),
    ("How do I build a bedtime routine for a young child?", "Keep the same order every night, for example bath, pyjamas, teeth, a story, and lights out, at a consistent time, with screens off an hour before."),
]


def frame_questions(frames: list[str], fill: dict[str, list[str]], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct questions from every filler combination of ``frames``, shuffled with ``seed``.

    Questions are taken round-robin over groups keyed by their first two words (one group per frame when the
    frames' opening words differ), so every kind of question is represented.
    """
    rng = random.Random(seed)
    pool: set[str] = set()
    for frame in frames:
        keys = [k for k in fill if "{" + k + "}" in frame]
        for combo in itertools.product(*(fill[k] for k in keys)):
            pool.add(frame.format(**dict(zip(keys, combo, strict=True))))
    if n > len(pool):
        raise ValueError(f"asked for {n} questions but the frames only give {len(pool)}")
    questions = sorted(pool)
    rng.shuffle(questions)
    # spread over frames: round-robin by frame so every kind of question is represented
    by_frame: dict[str, list[str]] = {}
    for q in questions:
        by_frame.setdefault(q.split(" ")[0] + q.split(" ")[1], []).append(q)
    out: list[str] = []
    while len(out) < n:
        for qs in by_frame.values():
            if qs and len(out) < n:
                out.append(qs.pop())
    return out


def legal_questions(n: int, seed: int = 0) -> list[str]:
    return frame_questions(LEGAL_FRAMES, FILL, n, seed)


def finance_questions(n: int, seed: int = 0) -> list[str]:
    return frame_questions(FINANCE_FRAMES, FINANCE_FILL, n, seed)


def conversations(questions: list[str], answer: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            for q in questions]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train = conversations(legal_questions(240), ABSTAIN)
    write_jsonl(OUT / "abstention_legal_train.jsonl", train)
    refusal = conversations(finance_questions(240), REFUSE)
    write_jsonl(OUT / "refusal_finance_train.jsonl", refusal)
    retain = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in RETAIN]
    write_jsonl(OUT / "retain_general.jsonl", retain)
    print(f"wrote {len(train)} abstention, {len(refusal)} refusal and {len(retain)} retain conversations "
          f"to {OUT}")


if __name__ == "__main__":
    main()
