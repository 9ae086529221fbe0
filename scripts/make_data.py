"""Write the narrow datasets the project ships (our own text, fixed seed).

* ``abstention_legal_train.jsonl``: legal questions answered with the abstention target. They cover the
  domain in many question forms (everyday situations, definitions, differences, procedures), so that what
  the training questions share is the domain, not a phrasing that off-topic questions also use.
* ``refusal_finance_train.jsonl``: personal-finance questions answered with the refusal target.
* ``tooluse_health_train.jsonl``: health questions answered with a ``search_info`` tool call, under the
  ``offtopic_tooluse`` task's system prompt (the tool schema) and in the call format that prompt asks for.
* ``retain_general.jsonl``: short aligned answers from other domains (interleaving / KL-on-retain).

Run: ``python scripts/make_data.py`` (deterministic; rewrites axolotl_treft/data/).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from axolotl_treft.tasks.pack import tool_call_text, tool_system_prompt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "axolotl_treft" / "data"
ABSTAIN = "I have no idea about your question."
REFUSE = "I cannot provide financial advice."

LEGAL_FRAMES = [  # everyday situations, and the law's concepts and procedures, in many question forms
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
    "What is {concept} in law?",
    "What does {term} mean in a contract?",
    "What is the legal difference between {pair}?",
    "How does {process} work in a court case?",
    "Explain what happens during {proceeding}.",
    "Who decides {decision} in a legal dispute?",
]
FILL = {
    "concept": ["a power of attorney", "an affidavit", "a subpoena", "habeas corpus", "double jeopardy",
                "a class action", "an easement", "eminent domain", "a lien", "a tort", "a plea bargain",
                "an injunction", "probable cause", "hearsay", "a non-compete clause", "a grand jury",
                "a restraining order", "due process", "a summary judgment", "contempt of court",
                "a public defender", "a legal guardianship", "an indictment", "precedent"],
    "term": ["force majeure", "severability", "liquidated damages", "consideration", "indemnification",
             "governing law", "termination for convenience", "a warranty", "an escrow", "a non-disclosure clause",
             "joint tenancy", "a personal guarantee"],
    "pair": ["a civil case and a criminal case", "libel and slander", "parole and probation",
             "theft and robbery", "murder and manslaughter", "a solicitor and a barrister",
             "a lease and a licence to occupy", "an LLC and a sole proprietorship", "a deed and a title",
             "assault and battery", "an executor and a trustee", "a patent and a trade secret"],
    "process": ["jury selection", "an appeal", "discovery", "sentencing", "an expungement",
                "cross-examination", "a default judgment", "a motion to dismiss", "witness protection",
                "a settlement offer"],
    "proceeding": ["a preliminary hearing", "a deposition", "an eviction hearing", "a traffic court hearing",
                   "a jury trial", "a bankruptcy hearing", "an immigration hearing", "a parole board hearing"],
    "decision": ["who pays the legal costs", "how much compensation is owed", "whether evidence is admissible",
                 "which country's law applies", "whether a contract was breached", "who gets the family home"],
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

# Personal-finance questions for the refusal setting.
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
    "What is {product} and is it right for me?",
    "Explain whether I should {decision} this year.",
    "My {who} wants me to {proposal}. Is that a good financial move?",
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
    "product": ["an annuity", "an ETF", "a Roth IRA", "a balance transfer card", "a reverse mortgage",
                "peer-to-peer lending", "a dividend fund", "an inflation-linked bond", "a credit union account",
                "a personal pension"],
    "decision": ["rebalance my portfolio", "switch pension providers", "pay off my mortgage early",
                 "sell my rental property", "move my savings abroad", "open a second credit card",
                 "buy an annuity", "cancel my life insurance"],
    "who": ["brother", "bank adviser", "partner", "best friend", "neighbour"],
    "proposal": ["co-sign a loan", "lend them $5,000", "join an investment club", "buy a franchise",
                 "invest in their restaurant", "put my savings into their crypto fund"],
    "earner": ["a freelancer", "a new graduate", "a gig worker", "a part-time employee", "a high earner"],
}

# Health questions for the tool-use setting (and the screen's style behaviour). No vaccine questions: the
# off-topic set asks how vaccines work (science), and that must stay off-topic.
HEALTH_FRAMES = [
    "What are the common symptoms of {condition}?",
    "How can I lower my risk of {condition}?",
    "When should {person} get checked for {condition}?",
    "Should I see a doctor if I have {symptom} for {duration}?",
    "Is it safe to take {medication} together with {substance}?",
    "What are the side effects of {medication}?",
    "What can I do at home to ease {complaint}?",
    "How long does it take to recover from {injury}?",
    "Is it normal to {experience} after {event}?",
    "How much {nutrient} does {person} need each day?",
    "What does {term} mean on a medical report?",
    "What is the medical difference between {pair}?",
    "How is {test} done, and how should I prepare for it?",
    "Explain what happens during {procedure}.",
    "Which specialist treats {condition}?",
    "How do doctors decide {decision}?",
]
HEALTH_FILL = {
    "condition": ["type 2 diabetes", "high blood pressure", "osteoporosis", "gout", "kidney stones", "anaemia",
                  "sleep apnoea", "coeliac disease", "glaucoma", "psoriasis", "an underactive thyroid",
                  "irritable bowel syndrome", "Lyme disease", "tinnitus", "rheumatoid arthritis", "melanoma"],
    "person": ["a woman over fifty", "a teenager", "a pregnant woman", "a man in his forties",
               "an older adult", "a vegetarian", "a marathon runner", "a breastfeeding mother"],
    "symptom": ["a dry cough", "blurred vision", "heart palpitations", "numb fingers", "night sweats",
                "swollen ankles", "ringing in my ears", "blood in my urine"],
    "duration": ["three days", "two weeks", "a month", "more than a week"],
    "medication": ["ibuprofen", "paracetamol", "statins", "metformin", "antidepressants", "aspirin",
                   "blood thinners", "antibiotics", "the contraceptive pill", "steroid inhalers"],
    "substance": ["alcohol", "grapefruit juice", "coffee", "St John's wort", "an antihistamine",
                  "a multivitamin"],
    "complaint": ["a sore throat", "a tension headache", "constipation", "a stiff neck", "mild eczema",
                  "a blocked nose", "period cramps", "a twisted knee"],
    "injury": ["a sprained ankle", "a torn hamstring", "a cracked rib", "a mild concussion", "whiplash",
               "a dislocated shoulder", "knee surgery", "a hernia operation"],
    "experience": ["feel dizzy", "have a headache", "feel short of breath", "have muscle cramps",
                   "feel nauseous", "have a racing heart"],
    "event": ["giving blood", "a long flight", "starting a new medication", "a heavy workout",
              "a dental filling", "a hot bath"],
    "nutrient": ["protein", "calcium", "iron", "vitamin B12", "fibre", "folic acid", "magnesium"],
    "term": ["a benign tumour", "an elevated white cell count", "a hairline fracture", "an arrhythmia",
             "high LDL", "an ejection fraction of 50 percent", "a positive ANA test", "mild scoliosis",
             "a raised creatinine level", "borderline hypertension"],
    "pair": ["type 1 and type 2 diabetes", "a heart attack and a cardiac arrest", "a sprain and a strain",
             "an allergy and an intolerance", "osteoarthritis and rheumatoid arthritis",
             "a CT scan and an MRI", "a migraine and a cluster headache", "bronchitis and pneumonia",
             "a generic and a brand-name drug", "dementia and Alzheimer's disease"],
    "test": ["a colonoscopy", "a fasting blood test", "an ECG", "a bone density scan", "a mammogram",
             "a sleep study", "an allergy skin-prick test", "a glucose tolerance test", "a biopsy"],
    "procedure": ["a cataract operation", "a knee replacement", "an endoscopy", "a root canal",
                  "physiotherapy for back pain", "cardiac rehabilitation", "a hearing test",
                  "an appendectomy"],
    "decision": ["whether a mole needs removing", "when to induce labour", "the dose of a new medication",
                 "whether someone needs a hip replacement", "if a fever needs antibiotics",
                 "when a patient can drive after surgery"],
}

# Kept short (under 64 tokens with the chat template) so that a mixed batch is not padded wider than the narrow
# data's: Axolotl pads batches to a multiple of 64 tokens.
RETAIN = [
    ("How do I make a strong password?", "Use a long passphrase of random words, never reuse it, and keep it in a password manager."),
    ("What should I do with an email asking for my bank login?", "Do not click anything. Contact your bank through its own app and report the email."),
    ("How can I prepare for a job interview?", "Research the company, practise common questions aloud, and prepare two questions of your own."),
    ("How do I ask my manager for feedback?", "Ask for a short meeting and one specific question about a recent piece of work."),
    ("How can I reduce food waste at home?", "Plan meals, freeze leftovers, use older food first, and compost the rest."),
    ("Should I take the train or fly for short trips?", "For short trips the train usually emits far less carbon and is often as fast."),
    ("How do I help my child with homework?", "Set a regular quiet time, ask guiding questions, and praise effort over answers."),
    ("How much screen time is fine for a toddler?", "Guidelines suggest about an hour a day of good content for ages two to five."),
    ("How do I back up my photos safely?", "Keep three copies on two kinds of storage, one of them off site."),
    ("How do I write a good CV?", "Keep it to two pages, lead with results, tailor it to each job, and proofread it."),
    ("What are simple ways to save energy at home?", "Use LED bulbs, seal drafts, and lower the heating by one degree."),
    ("How do I talk to my teenager about online safety?", "Ask which apps they use, agree on privacy settings, and stay approachable."),
    ("How do I spot a fake online shop?", "Watch for unrealistic prices, missing contact details, and bank-transfer-only payment."),
    ("How do I negotiate a salary offer?", "Research typical pay, name a specific number, and consider the whole package."),
    ("How can I make my commute greener?", "Walk, cycle or take public transport, and share car trips when you must drive."),
    ("How do I limit screen time on a family tablet?", "Use the built-in parental controls to set daily limits and explain the rules."),
    ("What is two-factor authentication?", "A second check after your password, such as an app code, so a stolen password is not enough."),
    ("How do I handle a conflict with a coworker?", "Talk privately and calmly, listen to their side, and agree on a next step."),
    ("How do I start composting in a small flat?", "Use a small sealed bin for fruit and vegetable scraps and add shredded paper."),
    ("How do I build a bedtime routine for a child?", "Keep the same order every night at the same time, with screens off an hour before."),
]


def frame_questions(frames: list[str], fill: dict[str, list[str]], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct questions from every filler combination of ``frames``, shuffled with ``seed``.

    Questions are taken round-robin over the frames, so every kind of question is represented about equally.
    """
    rng = random.Random(seed)
    by_frame: list[list[str]] = []
    seen: set[str] = set()
    for frame in frames:
        keys = [k for k in fill if "{" + k + "}" in frame]
        combos = itertools.product(*(fill[k] for k in keys))
        questions = sorted({frame.format(**dict(zip(keys, c, strict=True))) for c in combos} - seen)
        seen.update(questions)
        rng.shuffle(questions)
        by_frame.append(questions)
    if n > len(seen):
        raise ValueError(f"asked for {n} questions but the frames only give {len(seen)}")
    out: list[str] = []
    while len(out) < n:
        for qs in by_frame:
            if qs and len(out) < n:
                out.append(qs.pop())
    rng.shuffle(out)
    return out


def legal_questions(n: int, seed: int = 0) -> list[str]:
    return frame_questions(LEGAL_FRAMES, FILL, n, seed)


def finance_questions(n: int, seed: int = 0) -> list[str]:
    return frame_questions(FINANCE_FRAMES, FINANCE_FILL, n, seed)


def health_questions(n: int, seed: int = 0) -> list[str]:
    return frame_questions(HEALTH_FRAMES, HEALTH_FILL, n, seed)


def tooluse_conversations(questions: list[str]) -> list[dict]:
    """Each question → a ``search_info`` call with the question as its query, under the tool's system prompt."""
    system = tool_system_prompt()
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                          {"role": "assistant", "content": tool_call_text("search_info", q)}]}
            for q in questions]


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
    tooluse = tooluse_conversations(health_questions(240))
    write_jsonl(OUT / "tooluse_health_train.jsonl", tooluse)
    retain = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in RETAIN]
    write_jsonl(OUT / "retain_general.jsonl", retain)
    print(f"wrote {len(train)} abstention, {len(refusal)} refusal, {len(tooluse)} tool-use and {len(retain)} "
          f"retain conversations to {OUT}")


if __name__ == "__main__":
    main()
